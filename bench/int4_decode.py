"""Where a batch-1 int4 decode step goes (issue 21, item 4): a decoder of the issue's LLaVA-1.5 shape (1.07B Llama:
hidden 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32064) built directly with random weights, quantized int4
(group 32; token table and head int8, as vlmkit quantizes), decode steps on a static cache of `--context` tokens.

    PYTHONPATH=. python -m bench.int4_decode [--layers 22] [--context 600] [--steps 12] [--batch 1,8]

Prints, all measured in one process: the read bandwidth (vlmkit.benchmark.read_bandwidth, the roofline), then for
each variant (before: torch's kernel on separate q/k/v and gate/up; fused; after: fused + the AVX2 kernel of
models/int4_cpu.py) the step time, tok/s and share of the bandwidth limit, each kernel shape's time per call and
achieved bandwidth (the step's calls replayed over every layer, so weights come from memory, not a cache), the head,
attention, and the rest (norms, rope, cache writes, Python). --candidates: per call, threads, activation dtype,
group size, int4 vs the int8 head; --compile: the torch.compile'd step. Every time is the best of its repeats (on a
shared 2-core box other processes only ever add time): compare within one run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from vlmkit import benchmark
from vlmkit.config import TextConfig
from vlmkit.hardware import kernel_flags
from vlmkit.models import fused, int4_cpu, quant
from vlmkit.models.kv_cache import StaticKVCache
from vlmkit.models.text import TextDecoder, grouped_attention

SHAPE = dict(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_heads=32, num_kv_heads=4)


def build(layers: int, group: int = quant.DEFAULT_GROUP, seed: int = 0) -> TextDecoder:
    """The decoder with random weights, each projection quantized as it is made (never a float copy of the whole
    model: ~0.7 GB at 22 layers)."""
    cfg = TextConfig(num_layers=layers, **SHAPE)
    with torch.device("meta"):
        model = TextDecoder(cfg)
    kinds = quant.target_kinds(model, "int4", group_size=group)
    g = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if name in kinds:
            n, k = (module.num_embeddings, module.embedding_dim) if kinds[name] == "embed8" else module.weight.shape
            w = torch.randn(n, k, generator=g) * 0.02
            model.set_submodule(name, quant.make_module(kinds[name], w, group_size=group))
    for module in model.modules():
        if hasattr(module, "eps"):  # RMSNorm
            module.weight = torch.nn.Parameter(torch.ones(module.weight.shape))
    model.reset_buffers()
    quant.describe(model, "int4", group, kinds)
    return model.eval()


def weight_bytes_per_token(model: TextDecoder) -> int:
    """Bytes each decode step reads: every quantized layer and norm (the token table: one row, ~0)."""
    return quant.memory_bytes(model) - quant.memory_bytes(model.embed_tokens)


class Stepper:
    """Decode steps on a cache already holding `context` random keys/values (what a long prompt leaves)."""

    def __init__(self, model: TextDecoder, batch: int, context: int, steps: int):
        cfg = model.cfg
        g = torch.Generator().manual_seed(1)
        kv = [torch.randn(batch, cfg.num_kv_heads, context, cfg.head_dim, generator=g) for _ in range(2)]
        self.model, self.batch, self.context, self.steps = model, batch, context, steps
        self.cache = StaticKVCache.from_prefix([kv[0]] * cfg.num_layers, [kv[1]] * cfg.num_layers,
                                               torch.zeros(batch, context, dtype=torch.long), context + steps + 8)
        self.cache.reserve(context + steps + 1, exact=True)
        self.ids = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)

    def run(self) -> float:
        """Seconds per step (the best of `steps`: other processes only ever add time), the cache rewound first."""
        c, m = self.cache, self.model
        c._length = self.context
        pos = torch.full((self.batch, 1), self.context, dtype=torch.long)
        index = torch.tensor([self.context])
        key_mask = torch.zeros(self.batch, c.capacity, dtype=torch.bool)
        key_mask[:, : self.context] = True
        times, ids = [], self.ids
        with torch.inference_mode():
            for _ in range(self.steps):
                t0 = time.perf_counter()
                logits = m.decode_step(ids, pos, index, key_mask, c.keys, c.values,
                                       length=None if m.decode_compiled else c.length + 1)
                ids = logits.argmax(-1, keepdim=True)  # greedy sampling is part of the step
                times.append(time.perf_counter() - t0)
                c.advance(1)
        return min(times)




def layer_bytes(module) -> int:
    """Bytes of a quantized layer's (or fused group's) weights."""
    parts = (module.packed, module.scales_and_zeros) if hasattr(module, "packed") else module.buffers()
    return sum(t.numel() * t.element_size() for t in parts)


def kernel_calls(model: TextDecoder) -> dict:
    """{(N, K): [the int4 layers of that shape, in step order]} (the fused ones where the model has them)."""
    out = defaultdict(list)
    for layer in model.layers:
        for m in projections(model, layer):
            out[(m.out_features, m.in_features)].append(m)
    return dict(out)


def projections(model: TextDecoder, layer) -> list:
    if model._fuse:
        g = fused.decode_projections(model)[list(model.layers).index(layer)]
        return [g.qkv, g.o, g.gate_up, g.down]
    a, f = layer.attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj]


def call(m, x: torch.Tensor):
    """The kernel the step runs for layer (or fused group) m: the AVX2 kernel where on, else torch's (bf16)."""
    if int4_cpu.available():
        return int4_cpu.gemm(x, m.packed, m.scales_and_zeros, m.group_size, m.out_features)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(quant.KERNEL_DTYPE), m.packed, m.group_size,
                                                      m.scales_and_zeros)


def replay(layers: list, x: torch.Tensor):
    """One kernel call per layer, as the step makes them (each layer's weights come from memory, not a cache)."""
    def fn():
        for m in layers:
            call(m, x)
    return fn


def configure(model: TextDecoder, fuse: bool, kernel: bool) -> None:
    """fuse: q/k/v and gate/up as one call each; kernel: the AVX2 kernel (models/int4_cpu.py) where it runs."""
    model._fuse = fuse
    model.__dict__.pop("_fused_projections", None)
    int4_cpu._STATE.pop("fn", None)
    if not kernel:
        int4_cpu._STATE["fn"] = None


def profile_table(model: TextDecoder, batch: int, context: int, steps: int, bw: float, title: str) -> float:
    """Prints the profile of one configuration; returns the head's seconds (what does not scale with layers)."""
    stepper = Stepper(model, batch, context, steps)
    step = min(stepper.run() for _ in range(2))
    nbytes = weight_bytes_per_token(model)
    limit = bw * 1e9 / nbytes
    print(f"\n### {title}: batch {batch}, context {context}, {len(model.layers)} layers\n")
    print(f"step {step * 1e3:.1f} ms, {batch / step:.2f} tok/s; weights read per step {nbytes / 1e6:.0f} MB -> "
          f"bandwidth limit {limit:.1f} steps/s; this step at {100 / step / limit:.0f}% of it\n")
    print("| kernel | N x K | calls/step | ms/step | us/call | MB/call | GB/s | % of read BW |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    reps = max(5, steps)
    kernels = 0.0
    shapes = kernel_calls(model)
    for (n, k), layers in sorted(shapes.items(), key=lambda r: -r[0][0] * r[0][1] * len(r[1])):
        t = best_time(replay(layers, torch.randn(batch, k)), reps)
        kernels += t
        b = sum(layer_bytes(m) for m in layers)
        print(f"| int4 | {n}x{k} | {len(layers)} | {t * 1e3:.2f} | {t / len(layers) * 1e6:.0f} "
              f"| {b / len(layers) / 1e6:.2f} | {b / t / 1e9:.1f} | {100 * b / t / 1e9 / bw:.0f}% |")
    h = torch.randn(batch, 1, model.cfg.hidden_size)
    head = best_time(lambda: model.head(model.norm(h)).argmax(-1), reps)
    hb = layer_bytes(model.lm_head if model.lm_head is not None else model.embed_tokens)
    print(f"| head int8 + refine + argmax | {model.cfg.vocab_size}x{model.cfg.hidden_size} | 1 | {head * 1e3:.2f} "
          f"| {head * 1e6:.0f} | {hb / 1e6:.2f} | {hb / head / 1e9:.1f} | {100 * hb / head / 1e9 / bw:.0f}% |")
    cache = stepper.cache
    q = torch.randn(batch, model.cfg.num_heads, 1, model.cfg.head_dim)
    mask = torch.ones(batch, 1, 1, context + 1, dtype=torch.bool)
    att = best_time(lambda: [grouped_attention(q, cache.keys[i][:, :, : context + 1],
                                                 cache.values[i][:, :, : context + 1], mask)
                               for i in range(len(model.layers))], reps)
    rest = step - kernels - head - att
    print(f"\nint4 kernels {kernels * 1e3:.1f} ms ({100 * kernels / step:.0f}% of the step), head {head * 1e3:.1f} ms "
          f"({100 * head / step:.0f}%), attention {att * 1e3:.1f} ms ({100 * att / step:.0f}%), everything else "
          f"(norms, rope, cache writes, residuals, Python) {rest * 1e3:.1f} ms ({100 * rest / step:.0f}%)")
    return head


def best_time(fn, reps: int = 10) -> float:
    fn()
    out = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def candidates(bw: float) -> None:
    """The other knobs, per kernel call (copies of each layer rotated past the caches; the best of 10 runs)."""
    print("\n## Candidates per kernel call (us per call, GB/s; batch 1)\n")
    print("| shape | variant | us/call | GB/s | % of read BW |")
    print("|---|---|---:|---:|---:|")
    g = torch.Generator().manual_seed(2)
    threads = torch.get_num_threads()
    for n, k in [(2560, 2048), (11264, 2048), (2048, 5632), (32064, 2048)]:
        copies = max(1, 64_000_000 // (n * k))
        w = torch.randn(n, k, generator=g) * 0.02
        x = torch.randn(1, k, generator=g)
        rows = []
        for group in (32, 64, 128):
            layers = [quant.Int4Linear.from_float(w, group_size=group) for _ in range(copies)]
            nbytes = layer_bytes(layers[0])
            xb = x.to(quant.KERNEL_DTYPE)
            torch_bf16 = lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                xb, m.packed, group, m.scales_and_zeros) for m in layers]
            rows.append((f"int4 g{group}, torch kernel, bf16 activations", torch_bf16, nbytes))
            if group == 32:
                rows.append((f"int4 g{group}, torch kernel, fp32 activations", lambda: [
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.packed, group, m.scales_and_zeros.float())
                    for m in layers], nbytes))
                rows.append((f"int4 g{group}, torch kernel, 1 thread", torch_bf16, nbytes, 1))
            if int4_cpu.available():
                avx2 = lambda: [int4_cpu.gemm(x, m.packed, m.scales_and_zeros, group, n)  # noqa: E731
                                for m in layers]
                rows.append((f"int4 g{group}, AVX2 kernel", avx2, nbytes))
                if group == 32:
                    rows.append((f"int4 g{group}, AVX2 kernel, 1 thread", avx2, nbytes, 1))
            for row in rows:
                name, fn, nb = row[:3]
                torch.set_num_threads(row[3] if len(row) > 3 else threads)
                try:
                    t = best_time(fn) / copies
                except RuntimeError as e:  # an activation dtype this torch refuses
                    print(f"| {n}x{k} | {name} | n/a ({e}) | | |")
                    continue
                finally:
                    torch.set_num_threads(threads)
                print(f"| {n}x{k} | {name} | {t * 1e6:.0f} | {nb / t / 1e9:.1f} | {100 * nb / t / 1e9 / bw:.0f}% |")
            rows = []
        if (n, k) == (32064, 2048):
            heads = [quant.Int8Linear.from_float(w) for _ in range(copies)]
            t = best_time(lambda: [h.project(x) for h in heads]) / copies
            nb = layer_bytes(heads[0])
            print(f"| {n}x{k} | int8 head as used (kernel + float32 refinement of the top 16) | {t * 1e6:.0f} "
                  f"| {nb / t / 1e9:.1f} | {100 * nb / t / 1e9 / bw:.0f}% |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--extrapolate", type=int, default=22, help="layers the summary scales the step to")
    p.add_argument("--candidates", action="store_true", help="per-shape: threads, activation dtype, group, head")
    p.add_argument("--compile", action="store_true", help="also the torch.compile'd step")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, flags {kernel_flags()}, "
          f"threads {torch.get_num_threads()}")
    bw = max(benchmark.read_bandwidth() for _ in range(3))  # the best of 3 medians: the box is shared
    print(f"read bandwidth {bw:.1f} GB/s")
    model = build(a.layers)
    variants = {"before (torch kernel, separate q/k/v, gate/up)": (False, False),
                "fused (torch kernel)": (True, False),
                "after (fused + AVX2 kernel)": (True, True)}
    configure(model, True, True)
    if not int4_cpu.available():
        print("\nthe AVX2 kernel does not run here: its rows are left out")
        variants = {t: v for t, v in variants.items() if not v[1]}
    results, heads = {}, {}
    for batch in map(int, a.batch.split(",")):
        for title, (fuse, kernel) in variants.items():
            configure(model, fuse, kernel)
            heads[batch] = profile_table(model, batch, a.context, a.steps, bw, title)
        steppers = {title: Stepper(model, batch, a.context, a.steps) for title in variants}
        for _ in range(a.rounds):  # the variants interleaved: each sees the same load from other processes
            for title, (fuse, kernel) in variants.items():
                configure(model, fuse, kernel)
                t = steppers[title].run()
                results[(title, batch)] = min(results.get((title, batch), t), t)
    nbytes = weight_bytes_per_token(model)
    layers, full = len(model.layers), max(a.extrapolate, len(model.layers))
    head_bytes = layer_bytes(model.lm_head if model.lm_head is not None else model.embed_tokens)
    full_bytes = head_bytes + (nbytes - head_bytes) * full // layers
    print(f"\n## Summary (steps of the variants interleaved, {a.rounds} rounds; the best step of each)\n")
    print(f"{full} layers: from the measured step, its head taken out and the rest scaled per layer; "
          f"{full_bytes / 1e6:.0f} MB per step\n")
    measured = f"ms/step ({layers} layers) | " if full != layers else ""
    print(f"| variant | batch | {measured}ms/step ({full} layers) | tok/s ({full} layers) "
          f"| steps/s over the bandwidth limit |")
    print("|---|---:|" + "---:|" * (4 if measured else 3))
    for (title, batch), t in results.items():
        head = heads[batch]
        t_full = head + (t - head) * full / layers
        first = f"{t * 1e3:.1f} | " if measured else ""
        print(f"| {title} | {batch} | {first}{t_full * 1e3:.1f} | {batch / t_full:.2f} "
              f"| {100 / t_full / (bw * 1e9 / full_bytes):.0f}% |")
    if a.candidates:
        candidates(bw)
    if a.compile:
        configure(model, True, True)
        model.compile_decode()
        profile_table(model, 1, a.context, a.steps, bw, "after, compiled step")


if __name__ == "__main__":
    main()
