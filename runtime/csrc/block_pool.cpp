// See block_pool.h.
#include "block_pool.h"

#include <algorithm>
#include <cstring>

namespace tsc {

BlockRef& BlockRef::operator=(BlockRef&& o) noexcept {
  if (this != &o) {
    reset();
    pool_ = o.pool_;
    id_ = o.id_;
    o.pool_ = nullptr;
  }
  return *this;
}

void BlockRef::reset() {
  if (pool_ != nullptr) {
    pool_->release(id_);
    pool_ = nullptr;
  }
}

BlockPool::BlockPool(int num_blocks, int page_size)
    : page_size_(page_size), meta_(num_blocks),
      page_tokens_(static_cast<size_t>(num_blocks) * page_size) {
  if (num_blocks <= 0 || page_size <= 0) {
    throw std::invalid_argument("BlockPool: num_blocks and page_size must be positive");
  }
  free_.reserve(num_blocks);
  for (BlockId b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // pop 0 first
}

BlockRef BlockPool::take(BlockId id) {
  Meta& m = meta_[id];
  if (m.in_lru) {
    lru_.erase(m.lru_pos);
    m.in_lru = false;
  }
  ++m.ref;
  return BlockRef(this, id);
}

void BlockPool::evict(BlockId id) {
  Meta& m = meta_[id];
  lru_.erase(m.lru_pos);
  m.in_lru = false;
  cached_.erase(m.hash);
  m.hash = 0;
  m.pinned_until = -1.0;
  ++evictions_;
}

std::optional<BlockRef> BlockPool::allocate(double now) {
  if (!free_.empty()) {
    BlockId id = free_.back();
    free_.pop_back();
    return take(id);
  }
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    BlockId id = *it;
    if (meta_[id].pinned_until > now) continue;  // an agent's prefix, still retained
    evict(id);
    return take(id);
  }
  return std::nullopt;
}

std::optional<BlockRef> BlockPool::lookup(Hash h, const Token* tokens, double now) {
  auto it = cached_.find(h);
  if (it == cached_.end()) return std::nullopt;
  const Token* have = &page_tokens_[static_cast<size_t>(it->second) * page_size_];
  if (std::memcmp(have, tokens, sizeof(Token) * page_size_) != 0) return std::nullopt;
  return take(it->second);
}

void BlockPool::register_page(BlockId id, Hash h, const Token* tokens) {
  Meta& m = meta_.at(id);
  if (m.ref <= 0) throw std::logic_error("register_page on a block nobody holds");
  if (m.hash != 0 || cached_.count(h)) return;  // already known (another copy wins)
  m.hash = h;
  cached_[h] = id;
  std::memcpy(&page_tokens_[static_cast<size_t>(id) * page_size_], tokens,
              sizeof(Token) * page_size_);
}

void BlockPool::pin(BlockId id, double until) {
  Meta& m = meta_.at(id);
  m.pinned_until = std::max(m.pinned_until, until);
}

void BlockPool::release(BlockId id) {
  Meta& m = meta_[id];
  if (--m.ref > 0) return;
  if (m.hash != 0) {
    m.lru_pos = lru_.insert(lru_.end(), id);  // most recently used at the back
    m.in_lru = true;
  } else {
    m.pinned_until = -1.0;
    free_.push_back(id);
  }
}

void BlockPool::check(const std::vector<int>& refs) const {
  const int n = num_blocks();
  std::vector<int> seen(n, 0);
  auto fail = [](const std::string& what) { throw std::logic_error("BlockPool: " + what); };
  for (BlockId b : free_) {
    if (b < 0 || b >= n) fail("free list holds an out-of-range id");
    if (seen[b]++) fail("block " + std::to_string(b) + " is twice in the free list");
    if (meta_[b].ref != 0 || meta_[b].hash != 0 || meta_[b].in_lru) {
      fail("free block " + std::to_string(b) + " is referenced, hashed or cached");
    }
  }
  for (BlockId b : lru_) {
    if (seen[b]++) fail("block " + std::to_string(b) + " is both free and cached");
    if (meta_[b].ref != 0 || meta_[b].hash == 0 || !meta_[b].in_lru) {
      fail("cached block " + std::to_string(b) + " is referenced or has no hash");
    }
  }
  for (BlockId b = 0; b < n; ++b) {
    if (static_cast<int>(refs.size()) != n) fail("refs has the wrong length");
    if (meta_[b].ref != refs[b]) {
      fail("block " + std::to_string(b) + " has refcount " + std::to_string(meta_[b].ref) +
           " but " + std::to_string(refs[b]) + " live handles");
    }
    if (!seen[b] && meta_[b].ref <= 0) {
      fail("block " + std::to_string(b) + " is neither free, cached nor in use (leaked)");
    }
    if (seen[b] && meta_[b].ref > 0) fail("block " + std::to_string(b) + " in use and free");
  }
  for (const auto& [h, b] : cached_) {
    if (meta_[b].hash != h) fail("prefix map entry disagrees with block " + std::to_string(b));
  }
}

}  // namespace tsc
