"""The agentic serving benchmark (benchmarks/agentic/): workload shape and determinism against
the real trajectories in SmolLM2's real tokens, the tool format (tools, calls and tool
messages derived from the trajectories, checked against JSON Schema and against tsrun's own
request model and turn checks), the metrics math on hand-made records, the Pareto plot, and
a smoke sweep through the CLI against a live `tsrun` on the CPU (text and tool format)."""
from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest

from benchmarks.agentic import client as C
from benchmarks.agentic import metrics as M
from benchmarks.agentic import plot as P
from benchmarks.agentic import tools as X
from benchmarks.agentic import trajectories as T
from benchmarks.agentic import workload as W
from benchmarks.agentic.__main__ import main
from benchmarks.agentic.client import RequestRecord
from tscompile.annotations import Mesh
from tscompile.build import build
from tscompile.runtime.server import chat
from tscompile.runtime.server import validation as V
from tscompile.runtime.server.errors import APIError
from tscompile.runtime.server.schemas import ChatCompletionRequest

from ..runtime.test_tsrun import Server

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return T.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def trajs():
    return T.load()


# --- workload ------------------------------------------------------------------------------

def test_trajectories_cut_into_turns(trajs):
    assert len(trajs) == 22
    for t in trajs:
        assert t.prefix[0]["role"] == "system" and t.prefix[-1]["role"] == "user"
        assert len(t.observations) == t.turns - 1 and all(t.replies)
    by_name = {t.name: t for t in trajs}
    assert by_name["ctf-web-i_got_id_demo"].turns == 21          # 43 messages: s u (a o)x20 a
    assert by_name["pydicom__pydicom-1458"].turns == 12 and \
        len(by_name["pydicom__pydicom-1458"].prefix) == 3        # system, demo, task
    # function calling: the call lives in `action`, outside the text, and is part of the reply
    fc = by_name["marshmallow-1867-function_calling"]
    assert fc.replies[0].endswith("create reproduce.py")


def test_workload_follows_the_trajectories_and_hits_the_first_turn_size(tok, trajs):
    cfg = W.WorkloadConfig(sessions=len(trajs), first_turn_tokens=3000, max_context_tokens=None,
                           max_reply_tokens=64, seed=3)
    sessions = W.build(cfg, tok)
    by_name = {t.name: t for t in trajs}
    assert sorted(s.source for s in sessions) == sorted(by_name)   # each once per cycle
    for s in sessions:
        t = by_name[s.source]
        assert len(s.turns) == t.turns
        first = s.turns[0]
        assert abs(T.count_prompt(tok, first.messages) - 3000) <= 3, s.id
        assert first.new_tokens == first.context_tokens
        for k, turn in enumerate(s.turns):
            real = len(tok.encode(t.replies[k]))
            assert turn.reply_tokens == max(1, real)
            assert turn.max_tokens == min(turn.reply_tokens, 64)
            if k:                            # the tool output, at its real size (scale 1)
                obs = t.observations[k - 1] or "Your command ran successfully"
                assert turn.messages[0]["role"] == "user"
                assert turn.messages[0]["content"].startswith(obs[:40])
                assert turn.context_tokens > s.turns[k - 1].context_tokens
    # filler is the trajectories' own text, different per session
    ctx = [s.turns[0].messages[-1]["content"] for s in sessions]
    assert len(set(ctx)) == len(ctx) and "bash-$" in "".join(ctx)


def test_default_first_turn_is_50k_real_tokens(tok):
    (s,) = W.build(W.WorkloadConfig(sessions=1), tok)
    assert abs(T.count_prompt(tok, s.turns[0].messages) - 50_000) <= 10
    assert s.turns[-1].context_tokens <= W.WorkloadConfig().max_context_tokens


def test_workload_is_deterministic_and_round_trips(tok, tmp_path):
    cfg = W.WorkloadConfig(sessions=5, first_turn_tokens=1000, max_turns=4, seed=7)
    a, b = W.build(cfg, tok), W.build(cfg, tok)
    assert a == b
    assert W.build(W.WorkloadConfig(sessions=5, first_turn_tokens=1000, max_turns=4,
                                    seed=8), tok) != a
    path = W.save(tmp_path / "wl.jsonl", a, cfg, tokenizer="smol")
    header, back = W.load(path)
    assert back == a and header["config"]["seed"] == 7 and header["tokenizer"] == "smol"
    assert path.read_bytes() == W.save(tmp_path / "again.jsonl", back, cfg, "smol").read_bytes()


def test_tiny_workload_scales_down_and_caps(tok, smollm2_dir):
    cfg = W.WorkloadConfig(sessions=3, first_turn_tokens=200, max_turns=2, max_reply_tokens=4,
                           max_tool_tokens=64)
    for s in W.build(cfg, tok):
        assert len(s.turns) == 2
        assert abs(T.count_prompt(tok, s.turns[0].messages) - 200) <= 3
        assert [t.max_tokens for t in s.turns] == [4, 4]
        assert len(tok.encode(s.turns[1].messages[0]["content"])) <= 64 + 2
    bare = T.load_tokenizer(Path(smollm2_dir) / "tokenizer.json")   # no chat template
    (s,) = W.build(W.WorkloadConfig(sessions=1, first_turn_tokens=500, max_turns=1), bare)
    assert abs(T.count_prompt(bare, s.turns[0].messages) - 500) <= 3
    with pytest.raises(ValueError, match="sessions"):
        W.WorkloadConfig(sessions=0)


# --- tool format -----------------------------------------------------------------------------

def server_turn(body: dict) -> chat.ChatTurn:
    """The independent oracle: the body as tsrun parses it (its pydantic request model, from
    the JSON on the wire), its message checks and its `check_turn`; raises what tsrun would
    answer with a 400."""
    req = ChatCompletionRequest.model_validate_json(json.dumps(body))
    turn = chat.ChatTurn(V.template_messages(req.messages),
                         tools=[t.model_dump(exclude_none=True) for t in req.tools or ()],
                         tool_choice=req.tool_choice or "none")
    chat.check_turn(turn)
    return turn


@pytest.fixture(scope="module")
def tool_sessions(tok, trajs):
    cfg = W.WorkloadConfig(sessions=len(trajs), first_turn_tokens=2500, max_context_tokens=None,
                           max_reply_tokens=64, tool_format="openai", seed=5)
    return cfg, W.build(cfg, tok)


def test_tool_format_sessions_are_tool_conversations_tsrun_accepts(tok, trajs, tool_sessions):
    cfg, sessions = tool_sessions
    by_name = {t.name: t for t in trajs}
    assert sorted(s.source for s in sessions) == sorted(by_name)
    ccfg = C.ClientConfig(url="http://x")
    for s in sessions:
        t = by_name[s.source]
        assert len(s.turns) == t.turns
        names = [tool["function"]["name"] for tool in s.tools]
        assert len(set(names)) == len(names) and "bash" in names, s.source
        schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in s.tools}
        for schema in schemas.values():
            jsonschema.Draft202012Validator.check_schema(schema)
        assert abs(T.count_prompt(tok, s.turns[0].messages, s.tools) - 2500) <= 3, s.source
        calls, history, rendered = set(), [], None
        for k, turn in enumerate(s.turns):
            for m in turn.messages:
                for c in m.get("tool_calls") or ():
                    assert m["role"] == "assistant" and c["id"] not in calls
                    calls.add(c["id"])
                    args = json.loads(c["function"]["arguments"])
                    jsonschema.Draft202012Validator(schemas[c["function"]["name"]]).validate(args)
                if m["role"] == "tool":
                    assert m["tool_call_id"] in calls, (s.source, k)
            if k:   # the trajectory's reply k - 1, then its observation
                assert turn.messages[0]["role"] == "assistant"
                assert turn.messages[0]["content"] == t.steps[k - 1].thought
                assert turn.messages[1]["content"].startswith(
                    (t.observations[k - 1] or W.EMPTY_OUTPUT)[:40])
            history += C.turn_messages(s, k, "sid")
            rec = RequestRecord(1, "sid", s.source, k, turn.max_tokens)
            body = C.request_body(ccfg, "smol", rec, history, s.tools)
            assert body["tools"] == s.tools and body["tool_choice"] == "auto"
            turn_ = server_turn(body)
            assert turn_.tools == s.tools                  # identical on every turn
            rendered = turn_
        # tsrun's rendering of the whole conversation (SmolLM2's template has no `tools`:
        # declared in the system prompt, calls written as llama3 JSON)
        text = chat.render(tok, rendered, "llama3_json")
        assert f'"name": "{names[-1]}"' in text
    # the oracle is not vacuous: a tool message whose call is gone is a 400
    orphan = C.request_body(ccfg, "smol", rec, history[:2] + history[3:], s.tools)
    with pytest.raises(APIError, match="answers no tool call"):
        server_turn(orphan)
    # real structured calls are kept as recorded; thought-action text is parsed
    fc = next(s for s in sessions if s.source == "marshmallow-1867-function_calling")
    sent = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for turn in fc.turns[1:] for c in turn.messages[0]["tool_calls"]]
    steps = by_name[fc.source].steps
    assert sent == [(n, json.loads(a)) for st in steps[:-1] for n, a in st.calls]
    py = next(s for s in sessions if s.source == "pydicom__pydicom-1458")
    edit = py.turns[2].messages[0]["tool_calls"][0]["function"]
    assert edit["name"] == "edit" and set(json.loads(edit["arguments"])) == \
        {"start_line", "end_line", "replacement_text"}
    assert py.turns[3].messages[0]["tool_calls"][0]["function"] == {
        "name": "bash", "arguments": json.dumps({"command": "python reproduce_bug.py"})}


def test_tool_format_round_trips_and_text_format_has_no_tools(tok, tool_sessions, tmp_path):
    cfg, sessions = tool_sessions
    header, back = W.load(W.save(tmp_path / "t.jsonl", sessions, cfg, "smol"))
    assert back == sessions and header["config"]["tool_format"] == "openai"
    text_cfg = W.WorkloadConfig(sessions=2, first_turn_tokens=1000, max_turns=3)
    text = W.build(text_cfg, tok)
    lines = W.save(tmp_path / "x.jsonl", text, text_cfg).read_text().splitlines()[1:]
    assert all("tools" not in json.loads(ln) and all(
        m["role"] in ("system", "user") for t in json.loads(ln)["turns"] for m in t["messages"])
        for ln in lines)
    assert all(s.tools is None for s in W.load(tmp_path / "x.jsonl")[1])
    with pytest.raises(ValueError, match="tool_format"):
        W.WorkloadConfig(tool_format="anthropic")
    with pytest.raises(ValueError, match="tools of .* alone"):
        W.build(W.WorkloadConfig(sessions=1, first_turn_tokens=200, tool_format="openai"), tok)


def test_command_docs_and_actions_parse():
    yaml = X.parse_docs("""
open:
  docstring: opens the file
  signature: open "<path>" [<line_number>]
  arguments:
    - path (string) [required]: the path
    - line_number (integer) [optional]: the line

edit:
  docstring: replaces lines
Tips:
1. indent
  signature: edit <start_line>:<end_line>
<replacement_text>
end_of_edit
  arguments:
    - start_line (integer) [required]: first
    - end_line (integer) [required]: last
    - replacement_text (string) [required]: the text

decompile:
  docstring: decompiles
  signature: decompile <binary_path> <function_name>
  arguments:
    - binary_path (file path) [required]: the binary
    - function_name (string) [optional]: the function
""")
    cmds = {c.name: c for c in yaml}
    assert list(cmds) == ["open", "edit", "decompile"]      # "Tips:" is docstring text
    assert cmds["open"].tool()["function"]["parameters"] == {
        "type": "object", "required": ["path"], "properties": {
            "path": {"type": "string", "description": "the path"},
            "line_number": {"type": "integer", "description": "the line"}}}
    assert X.parse_action("open a.py 10", cmds["open"]) == {"path": "a.py", "line_number": 10}
    assert X.parse_action("open a.py ten", cmds["open"]) is None        # not an integer
    assert X.parse_action("edit 3:5\n  x = 1\nend_of_edit", cmds["edit"]) == \
        {"start_line": 3, "end_line": 5, "replacement_text": "  x = 1"}
    assert X.parse_action("decompile --function_name main rock", cmds["decompile"]) == \
        {"binary_path": "rock", "function_name": "main"}
    assert X.parse_action("decompile rock", cmds["decompile"]) == {"binary_path": "rock"}
    assert X.parse_action("open a.py && open b.py", cmds["open"]) is None   # a shell line
    one = {c.name: c for c in X.parse_docs(
        "goto <line_number> - moves the window\nedit\n<replacement_text>\nend_of_edit - "
        "replaces the text between the cursors\nsubmit - submits")}
    assert list(one) == ["goto", "edit", "submit"]
    assert X.parse_action("goto 7", one["goto"]) == {"line_number": 7}
    assert X.parse_action("edit\nfoo\nend_of_edit", one["edit"]) == {"replacement_text": "foo"}
    assert X.parse_action("submit", one["submit"]) == {}


def test_client_reads_streamed_tool_calls():
    """A tool-call answer streams no content: its argument chunks are the token arrivals and
    its calls are counted; the body carries the tools and tool_choice auto."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1",
               "type": "function", "function": {"name": "bash", "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {
                  "arguments": '{"command": "ls"}'}}]}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"completion_tokens": 9, "prompt_tokens": 50,
                                        "prompt_tokens_details": {"cached_tokens": 0}}}]
    seen = {}

    def reply(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
    tools = [X.bash_command().tool()]
    rec = RequestRecord(1, "s", "t", 0, 16)

    async def go() -> str:
        async with httpx.AsyncClient(transport=httpx.MockTransport(reply)) as http:
            return await C.chat(http, C.ClientConfig(url="http://x"), "m", rec,
                                [{"role": "user", "content": "hi"}], 0.0, tools)
    assert asyncio.run(go()) == ""
    assert seen["tools"] == tools and seen["tool_choice"] == "auto"
    assert rec.error is None and rec.finish_reason == "tool_calls"
    assert (rec.tools, rec.tool_calls, len(rec.token_times), rec.output_tokens) == (1, 1, 2, 9)


# --- metrics ---------------------------------------------------------------------------------

def rec(level, turn, start, times, out, prompt, cached, error=None, session="s"):
    return RequestRecord(level, f"{session}{level}", "t", turn, out, start=start,
                         latency=(times[-1] if times else 0.1), ttft=times[0] if times else None,
                         token_times=list(times), output_tokens=out, prompt_tokens=prompt,
                         cached_tokens=cached, error=error)


def test_level_metrics_on_synthetic_records():
    # request a: 5 tokens 0.1 s apart (10 tok/s); b: 3 tokens 0.05 s apart (20 tok/s);
    # c: an error (not counted); the window is 0 .. 3.0 s
    a = rec(4, 0, 0.0, [1.0, 1.1, 1.2, 1.3, 1.4], 5, 1000, 0)
    b = rec(4, 1, 2.9, [0.0, 0.05, 0.1], 3, 1100, 900)
    c = rec(4, 0, 0.5, [0.2], 1, 50, 0, error="HTTP 500: boom")
    lv = M.summarize_level([a, b, c], gpus=2)
    assert (lv["requests"], lv["completed"], lv["errors"]) == (3, 2, 1)
    assert lv["error_examples"] == ["HTTP 500: boom"]
    assert lv["window_s"] == pytest.approx(3.0)
    assert lv["tps_user_mean"] == pytest.approx(15.0)          # mean of 10 and 20
    assert lv["ttft_p50_s"] == pytest.approx(0.5)              # of 1.0 and 0.0
    assert lv["ttft_p99_s"] == pytest.approx(0.99)
    gaps = [0.1] * 4 + [0.05] * 2
    assert lv["itl_p50_s"] == pytest.approx(np.percentile(gaps, 50))
    assert lv["itl_p99_s"] == pytest.approx(np.percentile(gaps, 99))
    per_min_gpu = 60 / 3.0 / 2                                  # tokens -> tokens/min/GPU
    assert lv["output_tokens"] == 8 and lv["output_tpm_per_gpu"] == pytest.approx(8 * per_min_gpu)
    assert (lv["prompt_tokens"], lv["cached_prompt_tokens"], lv["uncached_prompt_tokens"]) == \
        (2100, 900, 1200)
    assert lv["cached_prompt_tpm_per_gpu"] == pytest.approx(900 * per_min_gpu)
    assert lv["uncached_prompt_tpm_per_gpu"] == pytest.approx(1200 * per_min_gpu)
    assert lv["prompt_tpm_per_gpu"] == pytest.approx(2100 * per_min_gpu)
    assert lv["prefix_cache_hit_rate"] == pytest.approx(900 / 2100)
    # a server without prompt_tokens_details: the split is unknown, not zero
    lv = M.summarize_level([rec(1, 0, 0, [0.0, 0.1], 2, 10, None)], gpus=1)
    assert lv["cached_prompt_tokens"] is None and lv["prefix_cache_hit_rate"] is None
    assert lv["prompt_tpm_per_gpu"] is not None
    assert lv["tool_requests"] == 0 and lv["tool_call_responses"] is None
    with pytest.raises(ValueError, match="gpus"):
        M.summarize_level([a], gpus=0)


def test_tool_call_responses_fraction(tmp_path):
    recs = [rec(1, k, 0.1 * k, [0.0, 0.1], 2, 10, 0) for k in range(4)]
    for r, (fin, n) in zip(recs, [("tool_calls", 1), ("length", 0), ("tool_calls", 2),
                                  ("stop", 0)]):
        r.tools, r.finish_reason, r.tool_calls = 3, fin, n
    recs.append(rec(1, 4, 0.5, [], 0, 10, 0, error="HTTP 400: x"))   # errors do not count
    recs[-1].tools = 3
    lv = M.summarize_level(recs, gpus=1)
    assert (lv["tool_requests"], lv["tool_call_responses"], lv["tool_calls"]) == (4, 0.5, 3)
    assert M.read_csv(M.write_csv(tmp_path / "r.csv", recs)) == recs


def levels(*pts):
    return [{"concurrency": c, "tps_user_mean": x, "output_tpm_per_gpu": y} for c, x, y in pts]


def test_headline_interpolates_at_the_floor():
    lv = levels((1, 150.0, 1000.0), (2, 110.0, 1800.0), (4, 60.0, 3000.0), (8, 30.0, 4000.0))
    h = M.headline(lv)
    # 70 lies between c=2 (110) and c=4 (60): 1800 + (70 - 110) * (3000 - 1800) / (60 - 110)
    assert h["70"]["output_tpm_per_gpu"] == pytest.approx(2760.0)
    assert h["70"]["between_concurrency"] == [2, 4] and h["70"]["reason"] is None
    assert h["200"]["output_tpm_per_gpu"] is None
    assert "no level reaches the floor" in h["200"]["reason"] and "150.0" in h["200"]["reason"]
    above = M.at_floor(levels((1, 300.0, 10.0), (2, 250.0, 20.0)), 70)
    assert above["output_tpm_per_gpu"] is None and "above the floor" in above["reason"]
    exact = M.at_floor(levels((1, 200.0, 10.0), (2, 100.0, 20.0)), 200)
    assert exact["output_tpm_per_gpu"] == pytest.approx(10.0)
    # non-monotonic: two crossings, the better one wins
    bumpy = levels((1, 80.0, 100.0), (2, 60.0, 200.0), (4, 75.0, 300.0), (8, 65.0, 500.0))
    assert M.at_floor(bumpy, 70)["between_concurrency"] == [4, 8]
    assert M.at_floor([], 70)["reason"].startswith("no level measured")


def test_csv_round_trip_and_pareto_png(tmp_path):
    recs = [rec(1, 0, 0.0, [0.2, 0.3, 0.4], 3, 100, 0),
            rec(2, 1, 0.1, [0.1], 1, 200, 150, error="stream error: x")]
    path = M.write_csv(tmp_path / "r.csv", recs)
    assert M.read_csv(path) == recs
    assert M.summarize(M.read_csv(path), 1)[0]["concurrency"] == 1
    sums = [{"metadata": {"label": lab, "gpus": 8},
             "levels": levels((1, 180.0 * k, 900.0 / k), (8, 60.0 * k, 5000.0 / k)),
             "headline": M.headline(levels((1, 180.0 * k, 900.0 / k), (8, 60.0 * k, 5000 / k)))}
            for lab, k in (("tsrun", 1.0), ("other", 1.3))]
    for i, s in enumerate(sums):
        (tmp_path / f"s{i}.json").write_text(json.dumps(s))
    assert main(["plot", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"),
                 "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


# --- smoke: the sweep CLI against a live tsrun on the CPU --------------------------------

def test_sweep_smoke_against_live_tsrun(tmp_path, smollm2_dir, capsys):
    prog = build("llama", preset="smollm2-135m", mesh=Mesh.build(1)).save(tmp_path / "smol.tsprog")
    wl = tmp_path / "wl.jsonl"
    assert main(["make-workload", "--tokenizer", str(smollm2_dir), "-o", str(wl),
                 "--sessions", "4", "--first-turn-tokens", "200", "--max-turns", "2",
                 "--max-reply-tokens", "4", "--max-tool-tokens", "64",
                 "--max-context-tokens", "2048"]) == 0
    s = Server(prog, smollm2_dir, "--max-model-len", "4096", "--kv-cache-tokens", "8192")
    out, tools_out = tmp_path / "sweep", tmp_path / "tools"
    try:
        rc = main(["sweep", "--url", s.url, "--workload", str(wl), "--out", str(out),
                   "--concurrency", "1,2", "--gpus", "1", "--pause", "0",
                   "--sessions-per-level", "2", "--duration", "60", "--warmup-sessions", "1",
                   "--warmup-turns", "1", "--label", "tsrun-cpu", "--no-progress"])
        # one short tool-format session (the workload built in memory by `run`)
        tools_rc = main(["run", "--url", s.url, "--tokenizer", str(smollm2_dir),
                         "--tool-format", "openai", "--sessions", "1", "--first-turn-tokens",
                         "2000", "--max-turns", "2", "--max-reply-tokens", "4",
                         "--max-tool-tokens", "64", "--max-context-tokens", "4096",
                         "--out", str(tools_out), "--concurrency", "1", "--pause", "0",
                         "--sessions-per-level", "1", "--warmup-sessions", "0",
                         "--no-progress"])
    finally:
        assert s.stop() == 0
    printed = capsys.readouterr()
    assert rc == 0 and tools_rc == 0, printed.err
    tool_rows = list(csv.DictReader((tools_out / "requests.csv").open()))
    assert [row["turn"] for row in tool_rows] == ["0", "1"]
    assert all(row["error"] == "" for row in tool_rows)      # HTTP 200, no stream error
    (tool_session,) = W.load(tools_out / "workload.jsonl")[1]
    assert all(int(row["tools"]) == len(tool_session.tools) > 1 for row in tool_rows)
    assert tool_session.turns[1].messages[1]["role"] == "tool"
    (tool_level,) = json.loads((tools_out / "summary.json").read_text())["levels"]
    assert tool_level["tool_requests"] == 2 and tool_level["tool_call_responses"] is not None
    assert "output TPM/GPU at 70 TPS/user" in printed.out
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 2 * 2 * 2                            # levels x sessions x turns
    assert all(row["error"] == "" for row in rows)
    assert all(int(row["output_tokens"]) == 4 for row in rows)    # ignore_eos: full length
    later = [row for row in rows if row["turn"] == "1"]
    assert later and all(int(row["cached_tokens"]) > 0 for row in later)
    meta = summary["metadata"]
    assert meta["model"] == "smol" and meta["gpus"] == 1 and meta["server_url"] == s.url
    assert meta["git"]["commit"] and meta["date"] and meta["workload"]["shape"]["sessions"] == 4
    assert meta["server_kernels"]["gqa_decode@cpu/float32"] == "reference"   # tsrun's own
    assert meta["server_kernels"]["gqa_prefill@cpu/float32"] == "reference"
    assert [lv["concurrency"] for lv in summary["levels"]] == [1, 2]
    for lv in summary["levels"]:
        assert lv["completed"] == lv["requests"] == 4 and lv["errors"] == 0
        assert lv["tps_user_mean"] > 0 and lv["output_tpm_per_gpu"] > 0
        assert lv["cached_prompt_tokens"] > 0 and lv["uncached_prompt_tokens"] > 0
        assert lv["ttft_p99_s"] >= lv["ttft_p50_s"] > 0
    assert set(summary["headline"]) == {"70", "200"}
