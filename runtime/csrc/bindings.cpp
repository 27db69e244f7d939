// pybind11 bindings: `tscompile.runtime._scheduler`. Plans cross as numpy arrays (copied:
// O(scheduled tokens)); the block table is a zero-copy view of the scheduler's own array.
// Exceptions: invalid_argument -> ValueError, out_of_range -> KeyError (unknown request),
// logic_error -> RuntimeError (an event out of order).
#include <algorithm>
#include <optional>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scheduler.h"

namespace py = pybind11;
using tsc::Finish;
using tsc::Scheduler;
using tsc::SchedulerConfig;

namespace {

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::array_t<uint8_t> to_numpy(const std::vector<uint8_t>& v) {
  py::array_t<uint8_t> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::dict plan_dict(const tsc::StepPlan& p) {
  py::dict d;
  d["req_ids"] = to_numpy(p.req_ids);
  d["slots"] = to_numpy(p.slots);
  d["query_lens"] = to_numpy(p.query_lens);
  d["seq_lens"] = to_numpy(p.seq_lens);
  d["sample"] = to_numpy(p.sample);
  d["spec_lens"] = to_numpy(p.spec_lens);
  d["num_decodes"] = p.num_decodes;
  d["num_verify"] = p.num_verify;
  d["num_sample"] = p.num_sample;
  d["num_logits"] = p.num_logits;
  d["input_ids"] = to_numpy(p.input_ids);
  d["positions"] = to_numpy(p.positions);
  d["slot_mapping"] = to_numpy(p.slot_mapping);
  d["admitted_ids"] = to_numpy(p.admitted_ids);
  d["admitted_slots"] = to_numpy(p.admitted_slots);
  d["admitted_cached"] = to_numpy(p.admitted_cached);
  d["preempted_ids"] = to_numpy(p.preempted_ids);
  d["floor_tps"] = p.floor_tps;
  d["predicted_s"] = p.predicted_s;
  return d;
}

Finish finish_of(int code) {
  if (code < 1 || code > 4) {
    throw std::invalid_argument("finish reason code must be 1 (stop), 2 (length), 3 (abort) "
                                "or 4 (error), got " + std::to_string(code));
  }
  return static_cast<Finish>(code);
}

// The step-time model from a dict of its six coefficients (every key required, no other).
tsc::StepTimeModel step_model_of(const py::dict& d) {
  static const char* keys[] = {"base", "per_decode", "per_kv_token", "prefill_base",
                               "per_prefill_token", "per_prefill_attn"};
  tsc::StepTimeModel m;
  double* fields[] = {&m.base, &m.per_decode, &m.per_kv_token, &m.prefill_base,
                      &m.per_prefill_token, &m.per_prefill_attn};
  for (auto item : d) {
    const std::string k = py::str(item.first);
    if (std::find_if(std::begin(keys), std::end(keys),
                     [&](const char* x) { return k == x; }) == std::end(keys)) {
      throw std::invalid_argument("step_model: unknown coefficient '" + k + "'");
    }
  }
  for (int i = 0; i < 6; ++i) {
    if (!d.contains(keys[i])) {
      throw std::invalid_argument(std::string("step_model: missing coefficient '") + keys[i] +
                                  "'");
    }
    *fields[i] = d[keys[i]].cast<double>();
  }
  return m;
}

}  // namespace

PYBIND11_MODULE(_scheduler, m) {
  m.doc() = "tscompile's C++ control plane: request state machines, KV blocks, prefix cache";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::out_of_range& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });
  m.attr("FINISH_NONE") = 0;
  m.attr("FINISH_STOP") = 1;
  m.attr("FINISH_LENGTH") = 2;
  m.attr("FINISH_ABORT") = 3;
  m.attr("FINISH_ERROR") = 4;

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](int num_blocks, int page_size, int max_num_seqs,
                       int max_num_batched_tokens, int max_model_len, double session_ttl,
                       bool enable_prefix_caching, int max_tokens_with_decodes,
                       double decode_floor_tps, std::optional<py::dict> step_model,
                       std::vector<int> prefill_buckets) {
             SchedulerConfig c;
             c.num_blocks = num_blocks;
             c.page_size = page_size;
             c.max_num_seqs = max_num_seqs;
             c.max_num_batched_tokens = max_num_batched_tokens;
             c.max_model_len = max_model_len;
             c.session_ttl = session_ttl;
             c.enable_prefix_caching = enable_prefix_caching;
             c.max_tokens_with_decodes = max_tokens_with_decodes;
             c.decode_floor_tps = decode_floor_tps;
             if (step_model) c.step_model = step_model_of(*step_model);
             c.prefill_buckets = std::move(prefill_buckets);
             return new Scheduler(c);
           }),
           py::kw_only(), py::arg("num_blocks"), py::arg("page_size"), py::arg("max_num_seqs"),
           py::arg("max_num_batched_tokens"), py::arg("max_model_len"),
           py::arg("session_ttl") = 0.0, py::arg("enable_prefix_caching") = true,
           py::arg("max_tokens_with_decodes") = 0, py::arg("decode_floor_tps") = 0.0,
           py::arg("step_model") = py::none(),
           py::arg("prefill_buckets") = std::vector<int>{})
      .def("add_request",
           [](Scheduler& s, uint64_t id, py::array_t<int32_t, py::array::c_style |
                                                             py::array::forcecast> prompt,
              int max_tokens, std::vector<int32_t> stop_ids, std::string session,
              double arrival, double decode_floor_tps) {
             std::vector<int32_t> toks(prompt.data(), prompt.data() + prompt.size());
             s.add_request(id, std::move(toks), max_tokens, std::move(stop_ids),
                           std::move(session), arrival, decode_floor_tps);
           },
           py::arg("id"), py::arg("prompt"), py::arg("max_tokens"),
           py::arg("stop_ids") = std::vector<int32_t>{}, py::arg("session") = "",
           py::arg("arrival") = 0.0, py::arg("decode_floor_tps") = 0.0)
      .def("abort",
           [](Scheduler& s, uint64_t id, int reason, double now) {
             s.abort(id, finish_of(reason), now);
           },
           py::arg("id"), py::arg("reason") = 3, py::arg("now") = 0.0)
      .def("plan", [](Scheduler& s, double now) { return plan_dict(s.plan(now)); },
           py::arg("now") = 0.0)
      .def("update",
           [](Scheduler& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast>
                                tokens, double now) {
             auto codes = s.update(tokens.data(), static_cast<size_t>(tokens.size()), now);
             py::array_t<int8_t> out(static_cast<py::ssize_t>(codes.size()));
             if (!codes.empty()) std::copy(codes.begin(), codes.end(), out.mutable_data());
             return out;
           },
           py::arg("tokens"), py::arg("now") = 0.0)
      .def("set_drafts",
           [](Scheduler& s, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> ids,
              py::array_t<int32_t, py::array::c_style | py::array::forcecast> lens,
              py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
             if (ids.size() != lens.size()) {
               throw std::invalid_argument("set_drafts(): ids and lens differ in length");
             }
             s.set_drafts(ids.data(), lens.data(), static_cast<size_t>(ids.size()),
                          tokens.data(), static_cast<size_t>(tokens.size()));
           },
           py::arg("ids"), py::arg("lens"), py::arg("tokens"),
           "Draft tokens for the next plan: request ids[i] gets the next lens[i] tokens.")
      .def("update_verified",
           [](Scheduler& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast>
                                tokens,
              py::array_t<int32_t, py::array::c_style | py::array::forcecast> counts,
              double now) {
             std::vector<int32_t> kept;
             auto codes = s.update(tokens.data(), static_cast<size_t>(tokens.size()), now,
                                   counts.data(), static_cast<size_t>(counts.size()), &kept);
             py::array_t<int8_t> out(static_cast<py::ssize_t>(codes.size()));
             if (!codes.empty()) std::copy(codes.begin(), codes.end(), out.mutable_data());
             return py::make_tuple(out, to_numpy(kept));
           },
           py::arg("tokens"), py::arg("counts"), py::arg("now") = 0.0,
           "update() for plans with verify rows: counts[j] tokens for sample row j (accepted "
           "drafts, then the bonus token); returns (finish codes, tokens kept per row).")
      .def("fail_pending",
           [](Scheduler& s, double now) { return to_numpy(s.fail_pending(now)); },
           py::arg("now") = 0.0)
      .def_property_readonly("block_table",
           [](py::object self) {
             Scheduler& s = self.cast<Scheduler&>();
             const auto& c = s.config();
             return py::array_t<int32_t>({c.max_num_seqs, s.max_blocks_per_seq()},
                                         s.block_table(), self);  // a view; keeps s alive
           })
      .def_property_readonly("has_work", &Scheduler::has_work)
      .def_property_readonly("plan_pending", &Scheduler::plan_pending)
      .def("state_of", &Scheduler::state_of)
      .def("check_invariants", &Scheduler::check_invariants)
      .def("stats", [](const Scheduler& s) {
        auto t = s.stats();
        py::dict d;
        d["running"] = t.running;
        d["waiting"] = t.waiting;
        d["blocks_total"] = t.blocks_total;
        d["blocks_free"] = t.blocks_free;
        d["blocks_cached"] = t.blocks_cached;
        d["blocks_in_use"] = t.blocks_in_use;
        d["prefix_hit_tokens"] = t.prefix_hit_tokens;
        d["prompt_tokens"] = t.prompt_tokens;
        d["generated_tokens"] = t.generated_tokens;
        d["preemptions"] = t.preemptions;
        d["evictions"] = t.evictions;
        d["spec_verify_rows"] = t.spec_verify_rows;
        d["spec_draft_tokens"] = t.spec_draft_tokens;
        d["spec_accepted_tokens"] = t.spec_accepted_tokens;
        return d;
      });
}
