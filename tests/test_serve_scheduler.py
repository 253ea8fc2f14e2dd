"""The server's scheduler (continuous batching with chunked prefill), driven directly with Jobs on tiny random
models of every family: chunked prompts and rows that join and leave a running batch give what each prompt gives
alone; a long prompt does not hold a short one; per-row sampling, stop strings, cancellation, failures, shutdown;
`max_prompt_tokens`. Ordering is asserted from the scheduler's own timestamps, never from wall-clock speed."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.processing.images import ImageLimits
from vlmkit.serve.batcher import Batcher, Job, Sampling
from vlmkit.serve.engine import APIError, Engine, GenParams

FAMILIES = ("llava", "idefics", "idefics2", "idefics3")


def png(size, color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE, GREEN = png((40, 30), (220, 40, 40)), png((32, 48), (30, 60, 220)), png((70, 30), (0, 200, 0))


def user(*parts):
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                         {"type": "image", "image": p} for p in parts]}]


def local(messages):
    """The same messages with PIL images, for VLM.chat."""
    return [{**m, "content": [{**p, "image": Image.open(io.BytesIO(p["image"]))} if p["type"] == "image" else p
                              for p in m["content"]]} for m in messages]


class Collector:
    """A job's sink: its text pieces and its terminal event."""

    def __init__(self):
        self.pieces, self.end, self.done = [], None, threading.Event()

    def __call__(self, event):
        if event[0] == "delta":
            self.pieces.append(event[1])
        else:
            self.end = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def make_job(engine, messages, max_tokens, **params):
    sampling = params.pop("sampling", Sampling())
    prep = engine.prepare(messages, GenParams(max_tokens=max_tokens))
    sink = Collector()
    job = Job(batch=prep.batch, prompt_tokens=prep.prompt_tokens, max_tokens=prep.max_tokens, sampling=sampling,
              sink=sink, **params)
    return job, sink


def wait_all(sinks, timeout=60):
    for s in sinks:
        assert s.done.wait(timeout), "a job did not finish"


@pytest.fixture(scope="module")
def models(hf_checkpoint_dir):
    return {f: vlmkit.load(hf_checkpoint_dir(f)) for f in FAMILIES}


def scheduler(m, **kwargs):
    batcher = Batcher(m, **kwargs)
    return batcher, Engine(m, batcher, model_name="test", limits=ImageLimits())


@pytest.mark.parametrize("chunk", [7, 4096], ids=["chunked", "together"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_joining_rows_match_each_prompt_alone(models, family, chunk):
    """Prompts prefilled 7 tokens a step (chunks cut through image tokens), or whole and together in one forward
    (chunk 4096); rows joining a batch that is already decoding and leaving it at different steps: every greedy
    answer is the one the prompt gets alone."""
    m = models[family]
    batcher, engine = scheduler(m, max_batch=4, prefill_chunk=chunk, batch_wait_ms=0)
    prompts = [user(RED, "What is in this picture? Describe it."),
               user("A longer question without any image here, to make a different length?"),
               user(GREEN, BLUE, "Same?"),
               user(BLUE, "Colour?")]
    max_tokens = [40, 5, 9, 3]  # the first answer outlasts the others' chunked prefill, on a fast idle CPU too
    jobs = [make_job(engine, p, n) for p, n in zip(prompts, max_tokens)]
    assert min(j.prompt_tokens for j, _ in jobs) > 7  # the prompts really are chunked
    batcher.start()
    try:
        batcher.submit(jobs[0][0])
        assert wait_first_token(jobs[0][0])  # the first row decodes alone before the others arrive
        for job, _ in jobs[1:]:
            batcher.submit(job)
        wait_all([s for _, s in jobs])
    finally:
        batcher.stop()
    for p, (job, sink) in zip(prompts, jobs):
        assert sink.end[0] == "done" and job.finish_reason in ("stop", "length"), (family, sink.end)
        assert sink.text == m.chat(local(p), max_new_tokens=job.max_tokens), family
        assert job.t_start <= job.t_first <= job.t_end
    assert batcher.stats["max_batch_seen"] > 1
    assert (batcher.stats["prefill_chunks"] > len(jobs)) == (chunk == 7)
    assert batcher.running == 0 and batcher.queued == 0


def wait_first_token(job, timeout=30):
    deadline = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if job.t_first or job.finished:
            return True
        deadline.wait(0.01)
    return False


def test_long_prompt_does_not_hold_short_ones(models):
    """A short request submitted while a long prompt is being prefilled gets its whole answer before the long
    prompt's first token; finished rows leave the batch at once (the short one ends before the long one)."""
    m = models["llava"]
    batcher, engine = scheduler(m, max_batch=4, prefill_chunk=16, batch_wait_ms=0)
    long_text = " ".join(f"word{i}" for i in range(300))
    long_job, long_sink = make_job(engine, user(long_text, "Summarise."), 8, ignore_eos=True)
    short_job, short_sink = make_job(engine, user(RED, "What?"), 3, ignore_eos=True)
    assert long_job.prompt_tokens > 20 * 16 > 2 * short_job.prompt_tokens
    batcher.start()
    try:
        batcher.submit(long_job)
        while batcher.stats["prefill_chunks"] < 2:  # the long prompt's prefill is under way
            threading.Event().wait(0.005)
        batcher.submit(short_job)
        wait_all([short_sink, long_sink])
    finally:
        batcher.stop()
    assert short_job.t_end < long_job.t_first, "the short request waited for the long prompt's prefill"
    assert long_job.completion_tokens == 8 and short_job.completion_tokens == 3


def test_rows_with_different_sampling_share_a_batch(models):
    """Greedy, seeded-sampling and repetition-penalised rows decode together; each gets its own rules: a seeded
    row draws exactly what generate(..., seed=s) draws, a greedy row what greedy generate gives."""
    m = models["idefics2"]
    batcher, engine = scheduler(m, max_batch=8, batch_wait_ms=0, prefill_chunk=4096)
    p = user(RED, "Tell me a story about it.")
    settings = [dict(), dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7),
                dict(do_sample=True, temperature=1.3, seed=8), dict(repetition_penalty=1.3)]
    jobs = [make_job(engine, p, 10, sampling=Sampling(**s)) for s in settings]
    for job, _ in jobs:
        batcher.submit(job)
    batcher.start()
    try:
        wait_all([s for _, s in jobs])
    finally:
        batcher.stop()
    assert batcher.stats["max_batch_seen"] == len(jobs)
    for s, (job, sink) in zip(settings, jobs):
        assert sink.text == m.chat(local(p), max_new_tokens=10, **s), s


def test_stop_strings_cancel_and_failures_stay_in_their_row(models):
    m = models["llava"]
    batcher, engine = scheduler(m, max_batch=8, batch_wait_ms=0)
    p = user(RED, "Describe it.")
    full, full_sink = make_job(engine, p, 12, ignore_eos=True)
    batcher.start()
    try:
        batcher.submit(full)
        wait_all([full_sink])
        answer = full_sink.text
        assert len(answer) > 4
        stop = answer[len(answer) // 2: len(answer) // 2 + 2]
        stopped, stopped_sink = make_job(engine, p, 12, ignore_eos=True, stop=(stop,))
        cancelled, cancelled_sink = make_job(engine, p, 1000, ignore_eos=True)
        broken, broken_sink = make_job(engine, p, 5, sampling=Sampling(do_sample=True, temperature=0.0))
        other, other_sink = make_job(engine, p, 12, ignore_eos=True)
        for job in (cancelled, stopped, broken, other):
            batcher.submit(job)
        assert wait_first_token(cancelled)
        cancelled.cancel()
        wait_all([stopped_sink, cancelled_sink, broken_sink, other_sink])
    finally:
        batcher.stop()
    assert stopped.finish_reason == "stop" and stopped_sink.text == answer[: answer.find(stop)]
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 1000
    assert broken_sink.end[0] == "error" and "temperature" in str(broken_sink.end[1])
    assert other.finish_reason == "length" and other_sink.text == answer
    assert batcher.stats["failed"] == 1 and batcher.stats["cancelled"] == 1 and batcher.stats["completed"] == 3


def test_shutdown_cancels_running_and_fails_queued(models):
    m = models["llava"]
    batcher, engine = scheduler(m, max_batch=1, batch_wait_ms=0)
    running, running_sink = make_job(engine, user("Go on."), 1000, ignore_eos=True)
    queued, queued_sink = make_job(engine, user("Next."), 5)
    batcher.start()
    batcher.submit(running)
    batcher.submit(queued)
    assert wait_first_token(running)
    batcher.stop()
    assert running_sink.done.wait(10) and running.finish_reason == "cancelled"
    assert queued_sink.end[0] == "error" and "shutting down" in str(queued_sink.end[1])
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(make_job(engine, user("x"), 2)[0])


def test_max_prompt_tokens_refuses_longer_prompts(models):
    m = models["idefics3"]
    batcher = Batcher(m)
    n = Engine(m, batcher, model_name="t", limits=ImageLimits()).prepare(user(RED, "What?"), GenParams()).prompt_tokens
    engine = Engine(m, batcher, model_name="t", limits=ImageLimits(), max_prompt_tokens=n - 1)
    with pytest.raises(APIError) as e:
        engine.prepare(user(RED, "What?"), GenParams())
    assert e.value.status == 400 and e.value.code == "prompt_too_long"
    assert f"{n} tokens" in e.value.message and "max-prompt-tokens" in e.value.message
    assert Engine(m, batcher, model_name="t", limits=ImageLimits(), max_prompt_tokens=n).prepare(
        user(RED, "What?"), GenParams()).prompt_tokens == n
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Engine(m, batcher, model_name="t", limits=ImageLimits(), max_prompt_tokens=0)


def test_max_prompt_tokens_over_http(models):
    """create_app(max_prompt_tokens=...): both dialects answer 400 naming the limit; shorter prompts still run."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (make install-dev)")
    from fastapi.testclient import TestClient

    from vlmkit.serve import create_app

    app = create_app(models["llava"], model_name="t", ui=False, max_prompt_tokens=12)
    long_text = "please describe " * 20
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"model": "t", "messages": [
            {"role": "user", "content": long_text}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
        assert "max-prompt-tokens" in r.json()["error"]["message"]
        r = client.post("/api/chat", json={"model": "t", "stream": False, "messages": [
            {"role": "user", "content": long_text}]})
        assert r.status_code == 400 and "max-prompt-tokens" in r.json()["error"], r.text
        r = client.post("/v1/chat/completions", json={"model": "t", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text


def test_stack_left_padded_and_trim_keep_each_row():
    """The cache operations behind join/leave: stacking right-aligns rows, select(start=) trims padding."""
    from vlmkit.models.kv_cache import StaticKVCache

    def cache(b, n, fill):
        c = StaticKVCache(2, 64)
        for layer in range(2):
            c.update(layer, torch.full((b, 1, n, 2), fill + layer), torch.full((b, 1, n, 2), -fill - layer))
        return c, torch.ones(b, n, dtype=torch.long)

    (a, ma), (b, mb) = cache(2, 3, 1.0), cache(1, 5, 10.0)
    both, mask = StaticKVCache.stack_left_padded([a, b], [ma, mb])
    assert both.length == 5 and mask.tolist() == [[0, 0, 1, 1, 1]] * 2 + [[1] * 5]
    assert both.keys[1][:2, 0, :2].abs().sum() == 0 and (both.keys[1][:2, 0, 2:5] == 2.0).all()
    assert (both.values[0][2, 0, :5] == -10.0).all()
    kept = both.select([0, 1], start=2)
    assert kept.length == 3 and torch.equal(kept.keys[0][:, :, :3], a.keys[0][:, :, :3])
