// See scheduler.h. Costs: plan() is O(scheduled sequences + scheduled tokens) plus one block
// allocation per page boundary crossed; block tables are updated in place (one int per new
// block), never rebuilt, so 256 decoding requests of 64K context cost the same to plan as
// 256 of 1K.
#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace tsc {

namespace {
const char* kStateNames[] = {"waiting", "prefilling", "decoding", "finished"};
}

Kv* Request::kv() {
  if (auto* p = std::get_if<Prefilling>(&state)) return &p->kv;
  if (auto* d = std::get_if<Decoding>(&state)) return &d->kv;
  return nullptr;
}

void StepPlan::clear() {
  req_ids.clear(); slots.clear(); query_lens.clear(); seq_lens.clear(); sample.clear();
  spec_lens.clear();
  input_ids.clear(); positions.clear(); slot_mapping.clear();
  admitted_ids.clear(); admitted_slots.clear(); admitted_cached.clear();
  preempted_ids.clear();
  num_decodes = num_verify = num_sample = num_logits = 0;
  floor_tps = predicted_s = 0.0;
}

Scheduler::Scheduler(const SchedulerConfig& c)
    : config_(c), pool_(c.num_blocks, c.page_size) {
  if (c.max_num_seqs <= 0 || c.max_num_batched_tokens <= 0 || c.max_model_len <= 0) {
    throw std::invalid_argument(
        "Scheduler: max_num_seqs, max_num_batched_tokens and max_model_len must be positive");
  }
  if (c.max_tokens_with_decodes < 0 || c.max_tokens_with_decodes > c.max_num_batched_tokens) {
    throw std::invalid_argument(
        "Scheduler: max_tokens_with_decodes must be in [0, max_num_batched_tokens]");
  }
  const StepTimeModel& m = c.step_model;
  if (c.decode_floor_tps < 0 || m.base < 0 || m.per_decode < 0 || m.per_kv_token < 0 ||
      m.prefill_base < 0 || m.per_prefill_token < 0 || m.per_prefill_attn < 0) {
    throw std::invalid_argument(
        "Scheduler: decode_floor_tps and the step-time model's coefficients must be >= 0");
  }
  for (size_t i = 0; i < c.prefill_buckets.size(); ++i) {
    if (c.prefill_buckets[i] < 1 || (i > 0 && c.prefill_buckets[i] <= c.prefill_buckets[i - 1]))
      throw std::invalid_argument("Scheduler: prefill_buckets must be ascending positive "
                                  "token counts");
  }
  max_blocks_ = (c.max_model_len + c.page_size - 1) / c.page_size;
  table_.assign(static_cast<size_t>(c.max_num_seqs) * max_blocks_, 0);
  for (int s = c.max_num_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
  totals_.blocks_total = c.num_blocks;
}

Request& Scheduler::get(uint64_t id) {
  auto it = requests_.find(id);
  if (it == requests_.end()) {
    throw std::out_of_range("request " + std::to_string(id) + " is not live (never added, "
                            "or already finished)");
  }
  return it->second;
}

void Scheduler::add_request(uint64_t id, std::vector<Token> prompt, int max_tokens,
                            std::vector<Token> stop_ids, std::string session,
                            double arrival, double decode_floor_tps) {
  if (requests_.count(id)) {
    throw std::invalid_argument("request " + std::to_string(id) + " already exists");
  }
  if (prompt.empty()) throw std::invalid_argument("request prompt is empty");
  if (!(decode_floor_tps >= 0)) throw std::invalid_argument("decode_floor_tps must be >= 0");
  if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
  if (static_cast<int>(prompt.size()) >= config_.max_model_len) {
    throw std::invalid_argument("prompt of " + std::to_string(prompt.size()) +
                                " tokens leaves no room under max_model_len " +
                                std::to_string(config_.max_model_len));
  }
  for (Token t : prompt) {
    if (t < 0) throw std::invalid_argument("negative token id in the prompt");
  }
  Request r;
  r.id = id;
  r.num_prompt = static_cast<int>(prompt.size());
  r.tokens = std::move(prompt);
  r.max_tokens = max_tokens;
  r.stop_ids = std::move(stop_ids);
  r.session = std::move(session);
  r.arrival = arrival;
  r.decode_floor_tps = decode_floor_tps;
  requests_.emplace(id, std::move(r));
  waiting_.push_back(id);
}

bool Scheduler::grow(Kv& kv, int tokens, double now) {
  const int ps = config_.page_size;
  while (static_cast<int>(kv.blocks.size()) * ps < tokens) {
    auto b = pool_.allocate(now);
    if (!b) return false;
    table_[static_cast<size_t>(kv.slot) * max_blocks_ + kv.blocks.size()] = b->id();
    kv.blocks.push_back(std::move(*b));
  }
  return true;
}

bool Scheduler::admit(Request& r, double now) {
  const int ps = config_.page_size;
  const int n = static_cast<int>(r.tokens.size());
  Kv kv;
  kv.slot = free_slots_.back();
  Hash h = 0;
  int matched = 0;
  if (config_.enable_prefix_caching) {
    // Leave at least one token to compute: its logits are what we sample from.
    for (int k = 0; k < (n - 1) / ps; ++k) {
      const Token* page = r.tokens.data() + static_cast<size_t>(k) * ps;
      Hash hk = hash_page(h, page, ps);
      auto b = pool_.lookup(hk, page, now);
      if (!b) break;
      table_[static_cast<size_t>(kv.slot) * max_blocks_ + k] = b->id();
      kv.blocks.push_back(std::move(*b));
      h = hk;
      ++matched;
    }
  }
  const int computed = matched * ps;
  const int chunk = prefill_chunk(computed, n - computed);
  if (chunk <= 0 || !grow(kv, computed + chunk, now)) return false;  // kv releases itself
  charge_prefill(computed, chunk);
  free_slots_.pop_back();
  r.num_computed = computed;
  r.pages_hashed = matched;
  r.last_hash = h;
  if (r.num_cached < 0) {
    r.num_cached = computed;
    totals_.prefix_hit_tokens += computed;
    totals_.prompt_tokens += r.num_prompt;
  }
  plan_.admitted_ids.push_back(r.id);
  plan_.admitted_slots.push_back(kv.slot);
  plan_.admitted_cached.push_back(computed);
  r.state = Prefilling{std::move(kv)};
  emit(r, *r.kv(), chunk);
  return true;
}

void Scheduler::emit(Request& r, Kv& kv, int n, int k) {
  // n tokens from position num_computed; the last k of them are r.draft[0..k) (a verify
  // row: n = 1 + k, all positions sampled).
  const int ps = config_.page_size;
  const int start = r.num_computed;
  const int have = static_cast<int>(r.tokens.size());
  plan_.req_ids.push_back(r.id);
  plan_.slots.push_back(kv.slot);
  plan_.query_lens.push_back(n);
  plan_.seq_lens.push_back(start + n);
  plan_.spec_lens.push_back(k);
  const bool sample = start + n - k == have;
  plan_.sample.push_back(sample ? 1 : 0);
  plan_.num_sample += sample;
  plan_.num_logits += sample ? 1 + k : 0;
  for (int p = start; p < start + n; ++p) {
    plan_.input_ids.push_back(p < have ? r.tokens[p] : r.draft[p - have]);
    plan_.positions.push_back(p);
    plan_.slot_mapping.push_back(static_cast<int64_t>(kv.blocks[p / ps].id()) * ps + p % ps);
  }
  budget_ -= n;
}

int Scheduler::prefill_chunk(int prefix, int want) const {
  int c = std::min(want, budget_);
  if (!time_limited_ || c <= 0) return c;
  // The largest c with chunk_cost(prefix, c) <= time_left_ (cost increasing in c).
  const StepTimeModel& m = config_.step_model;
  const double a = m.per_prefill_token + m.per_prefill_attn * prefix, b = m.per_prefill_attn;
  const double t = std::max(0.0, time_left_);
  const double fit = b > 0 ? (-a + std::sqrt(a * a + 2.0 * b * t)) / b : a > 0 ? t / a : c;
  int k = static_cast<int>(std::min<double>(fit, c));
  while (k > 0 && m.chunk_cost(prefix, k) > time_left_) --k;    // rounding
  // The step's graph pads its prefill tokens up to a bucket: if that padding does not fit
  // the time left, end the chunk on the largest bucket boundary below (no padding at all).
  const int total = prefill_tokens_ + k;
  if (k > 0 && m.chunk_cost(prefix, k) + m.per_prefill_token * (padded(total) - total) >
                   time_left_) {
    const auto& b = config_.prefill_buckets;
    auto it = std::upper_bound(b.begin(), b.end(), total);
    k = it == b.begin() || *std::prev(it) <= prefill_tokens_ ? 0
                                                             : *std::prev(it) - prefill_tokens_;
  }
  // Liveness: a step's first chunk gets at least kMinFloorPrefill tokens even when the
  // floor leaves less (decodes alone past it), so waiting prompts still progress.
  if (!prefill_scheduled_) k = std::max(k, std::min(c, kMinFloorPrefill));
  return k;
}

int Scheduler::padded(int tokens) const {
  const auto& b = config_.prefill_buckets;
  auto it = std::lower_bound(b.begin(), b.end(), tokens);
  return it == b.end() ? tokens : *it;     // beyond the buckets: an eager step, no padding
}

void Scheduler::charge_prefill(int prefix, int c) {
  prefill_scheduled_ = true;
  prefill_tokens_ += c;
  if (!time_limited_) return;
  time_left_ -= config_.step_model.chunk_cost(prefix, c);
  plan_.predicted_s += config_.step_model.chunk_cost(prefix, c);
}

void Scheduler::drop_from(std::vector<uint64_t>& v, uint64_t id) {
  auto it = std::find(v.begin(), v.end(), id);
  if (it != v.end()) v.erase(it);
}

void Scheduler::preempt(uint64_t id) {
  Request& r = get(id);
  Kv* kv = r.kv();
  free_slots_.push_back(kv->slot);
  r.state = Waiting{};             // destroys the Kv: every block reference returns
  r.draft.clear();
  r.num_computed = 0;
  r.pages_hashed = 0;
  r.last_hash = 0;
  drop_from(running_, id);
  waiting_.push_front(id);
  plan_.preempted_ids.push_back(id);
  ++totals_.preemptions;
}

int Scheduler::draft_len(const Request& r, int room) const {
  const int size = static_cast<int>(r.tokens.size());
  int k = static_cast<int>(r.draft.size());
  k = std::min(k, room);                               // the token budget
  k = std::min(k, r.max_tokens - r.num_output() - 1);  // the verify row's 1 + k outputs
  k = std::min(k, config_.max_model_len - size - 1);   // ... and the context limit
  return std::max(k, 0);
}

void Scheduler::trim(Request& r, Kv& kv) {
  const int ps = config_.page_size;
  const size_t need = (r.tokens.size() + ps - 1) / ps;
  while (kv.blocks.size() > need) {
    table_[static_cast<size_t>(kv.slot) * max_blocks_ + kv.blocks.size() - 1] = 0;
    kv.blocks.pop_back();            // the BlockRef returns its block
  }
}

void Scheduler::set_drafts(const uint64_t* ids, const int32_t* lens, size_t n,
                           const int32_t* tokens, size_t num_tokens) {
  if (plan_pending_) throw std::logic_error("set_drafts() while a plan awaits update()");
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    if (lens[i] < 0) throw std::invalid_argument("set_drafts() got a negative draft length");
    get(ids[i]);                     // unknown id: out_of_range
    total += static_cast<size_t>(lens[i]);
  }
  if (total != num_tokens) {
    throw std::invalid_argument("set_drafts() got " + std::to_string(num_tokens) +
                                " tokens for draft lengths summing to " + std::to_string(total));
  }
  for (size_t j = 0; j < num_tokens; ++j) {
    if (tokens[j] < 0) throw std::invalid_argument("set_drafts() got a negative token id");
  }
  size_t off = 0;
  for (size_t i = 0; i < n; ++i) {
    Request& r = get(ids[i]);
    r.draft.assign(tokens + off, tokens + off + lens[i]);
    off += static_cast<size_t>(lens[i]);
  }
}

const StepPlan& Scheduler::plan(double now) {
  if (plan_pending_) throw std::logic_error("plan() while the previous plan awaits update()");
  plan_.clear();
  budget_ = config_.max_num_batched_tokens;
  // 1. Decodes, oldest first; when blocks run out, the newest running request is preempted.
  // A decode with a draft becomes a verify row of 1 + k tokens (k clipped so that every
  // later decode still gets its token, and a step that carries decodes stays under
  // max_tokens_with_decodes); when its blocks do not fit, it falls back to a plain decode
  // before anything is preempted. Plain decodes are emitted first, then verify rows.
  std::vector<uint64_t> order = running_;
  int decoding = 0;
  for (uint64_t id : order) decoding += std::holds_alternative<Decoding>(get(id).state);
  const int cap = config_.max_tokens_with_decodes;
  int room = cap > 0 ? std::min(budget_, cap) : budget_;   // decode tokens this step may take
  std::vector<std::pair<Request*, int>> verify;            // (request, k)
  for (uint64_t id : order) {
    Request& r = get(id);
    auto* d = std::get_if<Decoding>(&r.state);
    if (d == nullptr) { r.draft.clear(); continue; }
    --decoding;                                   // decodes after this one
    if (budget_ < 1) { r.draft.clear(); continue; }
    int k = draft_len(r, room - 1 - decoding);
    bool ok = k > 0 && grow(d->kv, r.num_computed + 1 + k, now);
    if (!ok) {
      if (k > 0) trim(r, d->kv);                  // blocks a failed verify grow took
      k = 0;
      ok = grow(d->kv, r.num_computed + 1, now);
    }
    while (!ok) {
      uint64_t victim = running_.back();
      preempt(victim);
      if (victim == id) break;
      ok = grow(d->kv, r.num_computed + 1, now);
    }
    if (!ok) continue;
    room -= 1 + k;
    if (k > 0) {
      budget_ -= 1 + k;                           // emitted below, after the plain decodes
      verify.emplace_back(&r, k);
    } else {
      r.draft.clear();
      emit(r, d->kv, 1);
    }
  }
  plan_.num_decodes = static_cast<int>(plan_.req_ids.size());
  for (auto& [r, k] : verify) {
    budget_ += 1 + k;
    emit(*r, *r->kv(), 1 + k, k);
    r->draft.clear();
  }
  plan_.num_verify = static_cast<int>(verify.size());
  const int decode_rows = plan_.num_decodes + plan_.num_verify;
  const int decode_tokens = static_cast<int>(plan_.input_ids.size());
  // The decode floor: the highest floor among this step's decodes bounds the step's time,
  // and prefill gets what the step-time model leaves of it.
  time_limited_ = prefill_scheduled_ = false;
  prefill_tokens_ = 0;
  for (int i = 0; i < decode_rows; ++i) {
    const double f = get(plan_.req_ids[i]).decode_floor_tps;
    plan_.floor_tps = std::max(plan_.floor_tps, f > 0 ? f : config_.decode_floor_tps);
  }
  if (plan_.floor_tps > 0) {
    const StepTimeModel& m = config_.step_model;
    double kv = 0;
    for (int i = 0; i < decode_rows; ++i) kv += plan_.seq_lens[i];
    // A verify row's drafts are charged as prefill tokens (q_len > 1 rows run the chunk path).
    plan_.predicted_s = m.base + m.per_decode * decode_rows + m.per_kv_token * kv +
                        m.per_prefill_token * (decode_tokens - decode_rows);
    time_left_ = 1.0 / plan_.floor_tps - plan_.predicted_s - m.prefill_base;
    time_limited_ = true;
  }
  // A step that carries decodes takes at most max_tokens_with_decodes tokens in all, so a
  // long prefill cannot stall the running requests' next token for a whole big chunk.
  if (decode_rows > 0 && config_.max_tokens_with_decodes > 0) {
    budget_ = std::min(budget_, std::max(0, config_.max_tokens_with_decodes - decode_tokens));
  }
  // 2. Prefill chunks of admitted requests, then 3. admissions, FCFS.
  for (uint64_t id : running_) {
    Request& r = get(id);
    auto* p = std::get_if<Prefilling>(&r.state);
    if (p == nullptr || budget_ < 1) continue;
    const int prefix = r.num_computed;
    int chunk = prefill_chunk(prefix, static_cast<int>(r.tokens.size()) - prefix);
    if (chunk <= 0) continue;
    if (grow(p->kv, prefix + chunk, now)) {
      emit(r, p->kv, chunk);
      charge_prefill(prefix, chunk);
    }
  }
  while (!waiting_.empty() && budget_ > 0 && !free_slots_.empty()) {
    Request& r = get(waiting_.front());
    if (!admit(r, now)) break;     // head of line waits for memory
    waiting_.pop_front();
    running_.push_back(r.id);
  }
  if (time_limited_ && decode_rows < static_cast<int>(plan_.req_ids.size())) {
    plan_.predicted_s += config_.step_model.prefill_base;
  }
  plan_pending_ = !plan_.req_ids.empty();
  return plan_;
}

void Scheduler::register_pages(Request& r, Kv& kv) {
  if (!config_.enable_prefix_caching) return;
  const int ps = config_.page_size;
  while ((r.pages_hashed + 1) * ps <= r.num_computed) {
    const Token* page = r.tokens.data() + static_cast<size_t>(r.pages_hashed) * ps;
    r.last_hash = hash_page(r.last_hash, page, ps);
    pool_.register_page(kv.blocks[r.pages_hashed].id(), r.last_hash, page);
    ++r.pages_hashed;
  }
}

void Scheduler::finish(Request& r, Finish reason, double now) {
  if (Kv* kv = r.kv()) {
    if (!r.session.empty() && config_.session_ttl > 0) {
      for (const BlockRef& b : kv->blocks) pool_.pin(b.id(), now + config_.session_ttl);
    }
    free_slots_.push_back(kv->slot);
    drop_from(running_, r.id);
  } else {
    auto it = std::find(waiting_.begin(), waiting_.end(), r.id);
    if (it != waiting_.end()) waiting_.erase(it);
  }
  const uint64_t id = r.id;        // erase() must not read the key of the node it frees
  r.state = Finished{reason};      // releases the KV
  requests_.erase(id);
}

std::vector<int8_t> Scheduler::update(const int32_t* sampled, size_t n, double now,
                                      const int32_t* counts, size_t num_counts,
                                      std::vector<int32_t>* kept) {
  if (!plan_pending_) throw std::logic_error("update() without a pending plan");
  const size_t rows = static_cast<size_t>(plan_.num_sample);
  if (counts != nullptr && num_counts != rows) {
    throw std::invalid_argument("update() got " + std::to_string(num_counts) +
                                " counts for " + std::to_string(rows) + " sample rows");
  }
  if (counts == nullptr && n != rows) {
    throw std::invalid_argument("update() got " + std::to_string(n) + " tokens for " +
                                std::to_string(rows) + " sample rows");
  }
  for (size_t j = 0; j < n; ++j) {
    if (sampled[j] < 0) throw std::invalid_argument("update() got a negative token id");
  }
  // Validate every row before changing anything: counts in range, accepted drafts equal to
  // the planned ones (their KV was computed from those inputs).
  if (counts != nullptr) {
    size_t j = 0, off = 0, tok = 0;
    for (size_t i = 0; i < plan_.req_ids.size(); ++i) {
      const int q = plan_.query_lens[i], k = plan_.spec_lens[i];
      if (plan_.sample[i]) {
        const int c = counts[j];
        if (c < 1 || c > 1 + k) {
          throw std::invalid_argument("update(): sample row " + std::to_string(j) + " has " +
                                      std::to_string(k) + " drafts, so 1.." +
                                      std::to_string(1 + k) + " tokens, got " +
                                      std::to_string(c));
        }
        if (off + c > n) throw std::invalid_argument("update(): counts sum past the tokens");
        for (int m = 0; m + 1 < c; ++m) {
          if (sampled[off + m] != plan_.input_ids[tok + q - k + m]) {
            throw std::invalid_argument("update(): sample row " + std::to_string(j) +
                                        " accepts token " + std::to_string(sampled[off + m]) +
                                        " where its draft had " +
                                        std::to_string(plan_.input_ids[tok + q - k + m]));
          }
        }
        off += c;
        ++j;
      }
      tok += q;
    }
    if (off != n) {
      throw std::invalid_argument("update() got " + std::to_string(n) + " tokens, counts sum "
                                  "to " + std::to_string(off));
    }
  }
  std::vector<int8_t> codes(rows, static_cast<int8_t>(Finish::None));
  if (kept != nullptr) kept->assign(rows, 0);
  size_t j = 0, off = 0;
  for (size_t i = 0; i < plan_.req_ids.size(); ++i) {
    const bool sample = plan_.sample[i] != 0;
    const int c = sample ? (counts != nullptr ? counts[j] : 1) : 0;
    auto it = requests_.find(plan_.req_ids[i]);
    if (it == requests_.end()) {     // aborted while the step ran: drop its tokens
      if (sample) {
        codes[j++] = static_cast<int8_t>(Finish::Abort);
        off += c;
      }
      continue;
    }
    Request& r = it->second;
    Kv* kv = r.kv();
    if (kv == nullptr) throw std::logic_error("a planned request lost its KV before update()");
    const int k = plan_.spec_lens[i];
    if (!sample) {
      r.num_computed += plan_.query_lens[i];
      register_pages(r, *kv);
      continue;
    }
    // Tokens one by one: the first that finishes the request ends it, the rest are dropped.
    Finish f = Finish::None;
    int taken = 0;
    for (int m = 0; m < c && f == Finish::None; ++m) {
      const Token t = sampled[off + m];
      r.tokens.push_back(t);
      ++taken;
      if (std::find(r.stop_ids.begin(), r.stop_ids.end(), t) != r.stop_ids.end()) {
        f = Finish::Stop;
      } else if (r.num_output() >= r.max_tokens ||
                 static_cast<int>(r.tokens.size()) >= config_.max_model_len) {
        f = Finish::Length;
      }
    }
    off += c;
    totals_.generated_tokens += taken;
    if (k > 0) {
      ++totals_.spec_verify_rows;
      totals_.spec_draft_tokens += k;
      totals_.spec_accepted_tokens += std::min(c - 1, taken);
    }
    // KV is valid for the non-draft inputs and the accepted drafts, and only up to the
    // tokens the request kept (the rejected drafts' slots are rewritten later).
    r.num_computed = std::min(r.num_computed + plan_.query_lens[i] - k + (c - 1),
                              static_cast<int>(r.tokens.size()));
    register_pages(r, *kv);
    if (kept != nullptr) (*kept)[j] = taken;
    if (auto* p = std::get_if<Prefilling>(&r.state)) r.state = Decoding{std::move(p->kv)};
    codes[j++] = static_cast<int8_t>(f);
    if (f != Finish::None) {
      finish(r, f, now);
    } else {
      trim(r, *r.kv());              // the rejected drafts' blocks go back to the pool
    }
  }
  plan_pending_ = false;
  return codes;
}

std::vector<uint64_t> Scheduler::fail_pending(double now) {
  if (!plan_pending_) throw std::logic_error("fail_pending() without a pending plan");
  std::vector<uint64_t> failed;
  for (uint64_t id : plan_.req_ids) {
    auto it = requests_.find(id);
    if (it == requests_.end()) continue;   // aborted while the step ran
    finish(it->second, Finish::Error, now);
    failed.push_back(id);
  }
  plan_pending_ = false;
  return failed;
}

void Scheduler::abort(uint64_t id, Finish reason, double now) {
  if (reason == Finish::None) throw std::invalid_argument("abort() needs a finish reason");
  finish(get(id), reason, now);
}

std::string Scheduler::state_of(uint64_t id) const {
  auto it = requests_.find(id);
  if (it == requests_.end()) throw std::out_of_range("request " + std::to_string(id) +
                                                     " is not live");
  return kStateNames[it->second.state.index()];
}

Stats Scheduler::stats() const {
  Stats s = totals_;
  s.running = static_cast<int>(running_.size());
  s.waiting = static_cast<int>(waiting_.size());
  s.blocks_free = pool_.num_free();
  s.blocks_cached = pool_.num_cached();
  s.blocks_in_use = pool_.num_in_use();
  s.evictions = pool_.evictions();
  return s;
}

void Scheduler::check_invariants() const {
  std::vector<int> refs(pool_.num_blocks(), 0);
  std::vector<int> slot_owner(config_.max_num_seqs, 0);
  for (const auto& [id, r] : requests_) {
    const Kv* kv = nullptr;
    if (auto* p = std::get_if<Prefilling>(&r.state)) kv = &p->kv;
    if (auto* d = std::get_if<Decoding>(&r.state)) kv = &d->kv;
    if (std::holds_alternative<Finished>(r.state)) {
      throw std::logic_error("finished request " + std::to_string(id) + " still stored");
    }
    if (kv == nullptr) continue;
    if (slot_owner[kv->slot]++) throw std::logic_error("two requests share a table row");
    for (size_t k = 0; k < kv->blocks.size(); ++k) {
      ++refs[kv->blocks[k].id()];
      if (table_[static_cast<size_t>(kv->slot) * max_blocks_ + k] != kv->blocks[k].id()) {
        throw std::logic_error("block table row of request " + std::to_string(id) +
                               " disagrees with its blocks");
      }
    }
    const size_t need = (r.num_computed + config_.page_size - 1) / config_.page_size;
    if (kv->blocks.size() < need) throw std::logic_error("computed tokens without blocks");
    if (r.num_computed > static_cast<int>(r.tokens.size())) {
      throw std::logic_error("request " + std::to_string(id) + " has more computed tokens "
                             "than tokens");
    }
    const size_t most = (r.tokens.size() + config_.page_size - 1) / config_.page_size;
    if (!plan_pending_ && kv->blocks.size() > most) {
      throw std::logic_error("request " + std::to_string(id) + " holds " +
                             std::to_string(kv->blocks.size()) + " blocks for " +
                             std::to_string(r.tokens.size()) + " tokens (rejected drafts' "
                             "blocks not given back)");
    }
  }
  int used_slots = 0;
  for (int c : slot_owner) used_slots += c;
  if (used_slots + static_cast<int>(free_slots_.size()) != config_.max_num_seqs) {
    throw std::logic_error("table rows leaked");
  }
  if (static_cast<int>(running_.size()) != used_slots) {
    throw std::logic_error("running list disagrees with requests holding KV");
  }
  pool_.check(refs);
}

}  // namespace tsc
