// The paged KV block pool: reference-counted blocks, a prefix cache keyed by chained hashes
// of full pages, LRU eviction of unreferenced cached blocks, and session pinning.
//
// What it is: the owner of every KV block id. A block is in exactly one of three sets:
//   free      ref == 0, no hash              (free_ stack)
//   cached    ref == 0, hash, evictable       (lru_ list; pinned ones are skipped while pinned)
//   in use    ref  > 0, maybe hashed          (shared by ref BlockRef handles)
// What it is not: the scheduler's policy (scheduler.h) or the KV tensors (Python owns them;
// a block id indexes dim 0/1 of every layer's cache).
//
// Ownership: a BlockRef is a move-only handle to one reference; destroying it returns the
// reference. Request states that hold KV hold a vector of BlockRefs, so no block can leak
// or be freed twice, and a state without KV has no block ids to reach.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace tsc {

using Token = int32_t;
using BlockId = int32_t;
using Hash = uint64_t;

class BlockPool;

class BlockRef {
 public:
  BlockRef(BlockPool* pool, BlockId id) : pool_(pool), id_(id) {}
  BlockRef(BlockRef&& o) noexcept : pool_(o.pool_), id_(o.id_) { o.pool_ = nullptr; }
  BlockRef& operator=(BlockRef&& o) noexcept;
  BlockRef(const BlockRef&) = delete;
  BlockRef& operator=(const BlockRef&) = delete;
  ~BlockRef() { reset(); }
  BlockId id() const { return id_; }

 private:
  void reset();
  BlockPool* pool_;
  BlockId id_;
};

// Chained page hash: h_k = mix(h_{k-1}, tokens of page k). splitmix64-style mixing.
inline Hash hash_page(Hash parent, const Token* tokens, int n) {
  Hash h = parent ^ 0x9E3779B97F4A7C15ULL;
  for (int i = 0; i < n; ++i) {
    h ^= static_cast<uint32_t>(tokens[i]) + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
    h ^= h >> 31;
  }
  return h == 0 ? 1 : h;  // 0 means "no hash"
}

class BlockPool {
 public:
  BlockPool(int num_blocks, int page_size);

  // A fresh block: the free stack first, else evict the least recently used cached block
  // that is not pinned at `now`. nullopt when every block is in use or pinned.
  std::optional<BlockRef> allocate(double now);
  // Share the cached block holding page `h` (whose tokens must equal `tokens`), if any.
  std::optional<BlockRef> lookup(Hash h, const Token* tokens, double now);
  // Block `id` (in use) now holds a full page with hash `h`: later requests may share it.
  void register_page(BlockId id, Hash h, const Token* tokens);
  // Keep block `id` from eviction until `until` (session retention).
  void pin(BlockId id, double until);

  int num_blocks() const { return static_cast<int>(meta_.size()); }
  int page_size() const { return page_size_; }
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_cached() const { return static_cast<int>(lru_.size()); }
  int num_in_use() const { return num_blocks() - num_free() - num_cached(); }
  int ref(BlockId id) const { return meta_.at(id).ref; }
  bool hashed(BlockId id) const { return meta_.at(id).hash != 0; }
  int64_t evictions() const { return evictions_; }

  // Every block in exactly one set, maps consistent; `refs[b]` = references the caller
  // counted in live handles. Throws std::logic_error naming the first violation.
  void check(const std::vector<int>& refs) const;

 private:
  friend class BlockRef;
  struct Meta {
    int ref = 0;
    Hash hash = 0;
    double pinned_until = -1.0;
    bool in_lru = false;
    std::list<BlockId>::iterator lru_pos;
  };
  void release(BlockId id);
  BlockRef take(BlockId id);
  void evict(BlockId id);

  int page_size_;
  std::vector<Meta> meta_;
  std::vector<BlockId> free_;
  std::list<BlockId> lru_;                   // front: least recently used
  std::unordered_map<Hash, BlockId> cached_;  // hash -> block (in use or in lru_)
  std::vector<Token> page_tokens_;           // [num_blocks * page_size], valid when hashed
  int64_t evictions_ = 0;
};

}  // namespace tsc
