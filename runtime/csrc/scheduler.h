// The control plane: one finite-state machine per request and the step planner.
//
//   Waiting --admit--> Prefilling --last prompt chunk sampled--> Decoding --> Finished
//      ^                    |                                       |    (stop, length,
//      +------ preempt -----+---------------------------------------+     abort, error)
//
// States that hold KV (Prefilling, Decoding) own it as a `Kv` of move-only BlockRefs and a
// block-table row (`slot`); Waiting and Finished hold none, so a request in those states
// has no block ids to reach. Preemption (recompute) drops the KV and requeues the request
// at the front; its pages usually survive in the prefix cache.
//
// A step plan mixes decodes (one token each, listed first) and prefill chunks under a token
// budget and a sequence limit; it is a set of flat arrays (no per-request objects cross to
// Python). Python answers with the sampled tokens of the plan's sample rows (`update`) and
// with aborts; anything out of order is rejected with an exception, never undefined
// behaviour.
//
// Speculative decoding: before a plan, Python may give decoding requests draft tokens
// (`set_drafts`). The plan turns such a request's decode into a verify row: its last
// sampled token plus k <= draft length drafts (clipped to the token budget, max_tokens
// and max_model_len), q_len = 1 + k, every position sampled. Verify rows come after the
// plain decodes (the kernels' decodes have q_len 1) and before the prefill chunks, and the
// plan says k per sequence (`spec_lens`). `update` then takes 1..1+k tokens for a verify
// row: the accepted drafts (checked equal to the planned ones) plus the bonus token, and
// rolls the request back to the accepted length: KV counts as computed only up to the
// accepted tokens and blocks beyond the request's tokens are given back. Stop ids,
// max_tokens and max_model_len are checked token by token, so a finish mid-draft drops
// the rest.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "block_pool.h"

namespace tsc {

enum class Finish : int8_t { None = 0, Stop = 1, Length = 2, Abort = 3, Error = 4 };

// Predicted seconds of one step on this card (fitted from a start-up profile, runtime/
// step_model.py): base + per_decode * D + per_kv_token * (sum of the decodes' context) and,
// when the step carries prefill, prefill_base + per_prefill_token * P + per_prefill_attn *
// sum over chunks of c * (prefix + c / 2) (causal attention of a c-token chunk over its
// prefix). All coefficients >= 0.
struct StepTimeModel {
  double base = 0.0, per_decode = 0.0, per_kv_token = 0.0;
  double prefill_base = 0.0, per_prefill_token = 0.0, per_prefill_attn = 0.0;
  double chunk_cost(int prefix, int c) const {
    return per_prefill_token * c + per_prefill_attn * c * (prefix + 0.5 * c);
  }
};

// The fewest prefill tokens a floor-limited step that has prefill waiting still takes (so a
// floor the decodes alone exceed slows prompts down but never starves them).
constexpr int kMinFloorPrefill = 16;

struct SchedulerConfig {
  int num_blocks = 1024;
  int page_size = 16;
  int max_num_seqs = 64;              // also the number of block-table rows
  int max_num_batched_tokens = 2048;  // token budget per step
  int max_tokens_with_decodes = 0;    // budget of a step that carries decodes (0: the above)
  int max_model_len = 4096;
  double session_ttl = 0.0;           // seconds a finished session's prefix stays pinned
  bool enable_prefix_caching = true;
  // Decode-speed floor (tokens/s per decoding request; 0: none). With a floor, a step that
  // carries decodes gets prefill tokens only while the model's predicted step time stays
  // <= 1 / (the highest floor among its decodes), but at least kMinFloorPrefill; the token
  // budgets still apply.
  double decode_floor_tps = 0.0;
  StepTimeModel step_model;
  // The prefill-token sizes the step graphs pad a step's prefill to (ascending; empty: no
  // padding). A floor-limited step's prefill is sized so that, padded to its bucket, it
  // still fits the time left: when the padding does not fit, the chunk ends on a bucket.
  std::vector<int> prefill_buckets;
};

struct Kv {
  std::vector<BlockRef> blocks;
  int slot = -1;
};

struct Waiting {};
struct Prefilling { Kv kv; };
struct Decoding { Kv kv; };
struct Finished { Finish reason; };
using State = std::variant<Waiting, Prefilling, Decoding, Finished>;

struct Request {
  uint64_t id = 0;
  std::vector<Token> tokens;           // prompt, then generated tokens
  int num_prompt = 0;
  int max_tokens = 0;
  std::vector<Token> stop_ids;
  std::string session;
  double arrival = 0.0;
  double decode_floor_tps = 0.0;       // this request's floor (0: the config's)
  std::vector<Token> draft;            // drafts for the next plan (consumed by it)
  int num_computed = 0;                // tokens whose KV is in the cache
  int num_cached = -1;                 // prefix-hit tokens at first admission (-1: not yet)
  int pages_hashed = 0;                // full pages registered in the prefix cache
  Hash last_hash = 0;
  State state = Waiting{};

  int num_output() const { return static_cast<int>(tokens.size()) - num_prompt; }
  Kv* kv();
};

struct StepPlan {
  // Per scheduled sequence (decodes first).
  std::vector<uint64_t> req_ids;
  std::vector<int32_t> slots, query_lens, seq_lens;
  std::vector<uint8_t> sample;         // 1: the last token of this chunk is sampled
  std::vector<int32_t> spec_lens;      // draft tokens of a verify row (0: none); a verify
                                       // row samples all of its 1 + k positions
  int num_decodes = 0;                 // plain decodes (q_len 1), listed first
  int num_verify = 0;                  // verify rows, right after the plain decodes
  int num_sample = 0;
  int num_logits = 0;                  // sampled positions: sum over sample rows of 1 + k
  // Per token.
  std::vector<int32_t> input_ids, positions;
  std::vector<int64_t> slot_mapping;
  // Lifecycle changes made while planning.
  std::vector<uint64_t> admitted_ids;  // got a block-table row this step
  std::vector<int32_t> admitted_slots, admitted_cached;
  std::vector<uint64_t> preempted_ids; // lost their KV, back to waiting
  // The decode floor this step was sized for (0: none) and the step-time model's prediction
  // (seconds; 0 without a floor).
  double floor_tps = 0.0, predicted_s = 0.0;
  void clear();
};

struct Stats {
  int running = 0, waiting = 0;
  int blocks_total = 0, blocks_free = 0, blocks_cached = 0, blocks_in_use = 0;
  int64_t prefix_hit_tokens = 0, prompt_tokens = 0, generated_tokens = 0;
  int64_t preemptions = 0, evictions = 0;
  // Speculative decoding (cumulative): verify rows, draft tokens they carried, drafts kept.
  int64_t spec_verify_rows = 0, spec_draft_tokens = 0, spec_accepted_tokens = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  void add_request(uint64_t id, std::vector<Token> prompt, int max_tokens,
                   std::vector<Token> stop_ids, std::string session, double arrival,
                   double decode_floor_tps = 0.0);
  // Finish a live request now (client gone, stop string, error). Unknown id: out_of_range.
  void abort(uint64_t id, Finish reason, double now);
  const StepPlan& plan(double now);
  // Draft tokens for the next plan: request ids[i] gets tokens[off_i, off_i + lens[i]).
  // Replaces any earlier draft; a request that is not decoding at plan time ignores its
  // draft. Unknown id: out_of_range; negative token or length: invalid_argument.
  void set_drafts(const uint64_t* ids, const int32_t* lens, size_t n, const int32_t* tokens,
                  size_t num_tokens);
  // Tokens for the pending plan's sample rows, in order; returns a finish code per row.
  // `counts` (nullptr: one token per row) gives the tokens of each sample row: 1 for a
  // plain row, 1..1+k for a verify row (its first count - 1 tokens must be its planned
  // drafts). `kept` (if given) receives the tokens each row kept (fewer when it finished
  // mid-draft).
  std::vector<int8_t> update(const int32_t* sampled, size_t n, double now,
                             const int32_t* counts = nullptr, size_t num_counts = 0,
                             std::vector<int32_t>* kept = nullptr);
  // The pending plan's forward failed: finish every request it scheduled with Error and
  // drop the plan. Unlike update(), nothing is counted as computed and no page reaches the
  // prefix cache (the failed chunk's KV was never written). Returns the ids it finished
  // (those aborted while the step ran are gone already).
  std::vector<uint64_t> fail_pending(double now);

  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  bool plan_pending() const { return plan_pending_; }
  std::string state_of(uint64_t id) const;
  Stats stats() const;
  const SchedulerConfig& config() const { return config_; }
  int max_blocks_per_seq() const { return max_blocks_; }
  int32_t* block_table() { return table_.data(); }
  void check_invariants() const;

 private:
  Request& get(uint64_t id);
  bool admit(Request& r, double now);
  bool grow(Kv& kv, int tokens, double now);
  void emit(Request& r, Kv& kv, int n, int k = 0);
  int draft_len(const Request& r, int room) const;   // drafts a verify row may take
  void trim(Request& r, Kv& kv);                      // blocks beyond r.tokens back
  int prefill_chunk(int prefix, int want) const;   // tokens a chunk may take now
  void charge_prefill(int prefix, int c);
  void preempt(uint64_t id);
  void finish(Request& r, Finish reason, double now);
  void register_pages(Request& r, Kv& kv);
  void drop_from(std::vector<uint64_t>& v, uint64_t id);

  SchedulerConfig config_;
  BlockPool pool_;
  int max_blocks_;
  std::vector<int32_t> table_;                 // [max_num_seqs, max_blocks_] block ids
  std::vector<int> free_slots_;
  std::unordered_map<uint64_t, Request> requests_;
  std::vector<uint64_t> running_;              // admission order
  std::deque<uint64_t> waiting_;
  StepPlan plan_;
  bool plan_pending_ = false;
  int budget_ = 0;
  double time_left_ = 0.0;                     // floor-limited steps: seconds left
  bool time_limited_ = false, prefill_scheduled_ = false;
  int prefill_tokens_ = 0;         // prefill tokens planned so far this step
  int padded(int tokens) const;    // the prefill bucket a step of `tokens` pads to
  Stats totals_;
};

}  // namespace tsc
