"""Decode tokens/s of a LLaVA-1.5-7B-shaped LLaMA language model at batch 1: fp16 vs casp packed weights.

The language model of LLaVA-1.5-7B (Vicuna-7B: 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000)
with random fp16 weights (nothing is downloaded), run by a small decode loop written here: one token per
step, static KV buffers of ``--max-len`` positions (attention reads the whole buffer under a mask, so a
step has fixed shapes and can be captured in a CUDA graph), greedy next token. The same model is timed

* fp16: every linear an ``nn.Linear``;
* casp: every decoder linear (q, k, v, o, gate, up, down) a ``casp.quant.linear.QuantLinear`` holding
  random "uniform" codes (2-bit, group 128: 2.25 bits per weight with the fp16 scales and zeros), forward
  through ``casp.kernels.linear`` (the Triton kernels on CUDA), once per batch-1 kernel in ``--m1``
  (uniform_config.GEMV_M1: "gemv" stored layout, "slab"/"slab16"/"kmajor" repacked layouts);
* casp mix: as casp but layers 0, 1, 30, 31 at 4 bits (2.25 average code bits, 2.5 bits per weight
  with scales and zeros); the embedding and lm_head stay fp16 in every variant.

Each variant is timed eagerly (a Python loop of steps: launch overhead included) and as CUDA-graph
replays of one captured step (no launch overhead). Reported: tokens/s, ms/token, the weight bytes a step
reads and the ratio to fp16 in the same run. Checks: graph replay gives the eager step's logits, and
the casp step's logits agree with the same model on the torch path (dequantized fp16 weights).

    python benchmarks/decode_7b.py --out benchmarks/results/decode_7b_h100.txt   # GPU
    python benchmarks/decode_7b.py --tiny                                       # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from casp.kernels import uniform_config  # noqa: E402
from casp.quant.linear import QuantLinear, dense_weights  # noqa: E402
from casp.quant.uniform import UniformWeight  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAVA_7B = Shape(layers=32, hidden=4096, mlp=11008, heads=32, kv_heads=32, vocab=32000)
TINY = Shape(layers=4, hidden=128, mlp=352, heads=4, kv_heads=2, vocab=256)
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class Block(nn.Module):
    def __init__(self, s: Shape, dtype: torch.dtype, device):
        super().__init__()
        kv = s.kv_heads * s.head_dim
        dims = {"q": (s.hidden, s.hidden), "k": (s.hidden, kv), "v": (s.hidden, kv), "o": (s.hidden, s.hidden),
                "gate": (s.hidden, s.mlp), "up": (s.hidden, s.mlp), "down": (s.mlp, s.hidden)}  # fmt: skip
        self.lin = nn.ModuleDict(
            {n: nn.Linear(i, o, bias=False, dtype=dtype, device=device) for n, (i, o) in dims.items()}
        )
        self.norm1 = nn.Parameter(torch.ones(s.hidden, dtype=dtype, device=device), requires_grad=False)
        self.norm2 = nn.Parameter(torch.ones(s.hidden, dtype=dtype, device=device), requires_grad=False)


class Decoder(nn.Module):
    """LLaMA decoder for one token per step with static KV buffers (fixed shapes: CUDA-graph capturable)."""

    def __init__(self, s: Shape, max_len: int, dtype: torch.dtype, device):
        super().__init__()
        self.s, self.max_len = s, max_len
        with torch.no_grad():
            self.embed = nn.Embedding(s.vocab, s.hidden, dtype=dtype, device=device)
            self.blocks = nn.ModuleList(Block(s, dtype, device) for _ in range(s.layers))
            self.norm = nn.Parameter(torch.ones(s.hidden, dtype=dtype, device=device), requires_grad=False)
            self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False, dtype=dtype, device=device)
            self.embed.weight.normal_(0, 1)
        self.embed.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(False)
        cache = (s.layers, 1, s.kv_heads, max_len, s.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(cache, dtype=dtype, device=device))
        inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        ang = torch.arange(max_len, device=device).float()[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)  # [L, hd]
        self.register_buffer("cos", ang.cos().to(dtype))
        sign = torch.cat([-torch.ones(s.head_dim // 2, device=device), torch.ones(s.head_dim // 2, device=device)])
        self.register_buffer("sin", (ang.sin() * sign).to(dtype))  # signed for _rope
        self.register_buffer("positions", torch.arange(max_len, device=device))

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        # t cos + rotate_half(t) sin, with rotate_half(t) = roll(t, hd/2) * (-1 .. -1, 1 .. 1): 3 kernels, not 5
        return torch.addcmul(t * cos, t.roll(t.shape[-1] // 2, dims=-1), sin_signed)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] of the token tok [1] at position pos [1] (a tensor, so graphs can replay it)."""
        s = self.s
        hd, H, Hkv = s.head_dim, s.heads, s.kv_heads
        x = self.embed(tok)  # [1, hidden]
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, hd]
        mask = (self.positions <= pos).view(1, 1, 1, self.max_len)
        for i, b in enumerate(self.blocks):
            h = rms_norm(x, b.norm1)
            q = self._rope(b.lin["q"](h).view(1, H, 1, hd), cos, sin)
            k = self._rope(b.lin["k"](h).view(1, Hkv, 1, hd), cos, sin)
            v = b.lin["v"](h).view(1, Hkv, 1, hd)
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            kc, vc = self.k_cache[i], self.v_cache[i]
            if Hkv != H:
                kc, vc = kc.repeat_interleave(H // Hkv, 1), vc.repeat_interleave(H // Hkv, 1)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)  # [1, H, 1, hd]
            x = x + b.lin["o"](a.reshape(1, H * hd))
            h = rms_norm(x, b.norm2)
            x = x + b.lin["down"](F.silu(b.lin["gate"](h)) * b.lin["up"](h))
        return self.lm_head(rms_norm(x, self.norm))


def random_quant_linear(n_out: int, n_in: int, bits: int, seed: int, device) -> QuantLinear:
    """A QuantLinear of random ``bits``-bit codes, group 128, scales sized like a trained layer's weights."""
    g = min(128, n_in)
    groups = -(-n_in // g)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n_out, n_in), generator=gen, device=device)
    # scales sized like the layer's weights (std ~ 1/sqrt(K)), zeros mid-range
    std = 1.0 / math.sqrt(3 * n_in)
    scales = torch.full((n_out, groups), 2 * std * math.sqrt(3) / ((1 << bits) - 1), device=device)
    scales = scales * (0.75 + 0.5 * torch.rand(n_out, groups, generator=gen, device=device))
    zeros = torch.full((n_out, groups), ((1 << bits) - 1) / 2, device=device)
    return QuantLinear.from_weight(UniformWeight.from_codes(codes, scales, zeros, bits, g))


def quantize_random(model: Decoder, bits_of_layer) -> None:
    """Replace every decoder linear by a QuantLinear of random codes (group 128), freeing the fp16 weight."""
    for i, b in enumerate(model.blocks):
        for name in LINEARS:
            n_out, n_in = b.lin[name].weight.shape
            device = b.lin[name].weight.device
            b.lin[name] = random_quant_linear(n_out, n_in, bits_of_layer(i), 1000 * i + LINEARS.index(name), device)


def weight_bytes(model: Decoder) -> int:
    """Bytes of weights a decode step reads: every decoder linear, the final norm and lm_head, one embedding row."""
    n = sum(t.numel() * t.element_size() for b in model.blocks for t in list(b.parameters()) + list(b.buffers()))
    n += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return n + model.s.hidden * model.embed.weight.element_size()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_eager(model: Decoder, n: int, device) -> tuple[float, torch.Tensor]:
    """Seconds per token of n eager steps (after 2 warm-up steps); also returns the logits of step 0."""
    tok = torch.zeros(1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        first = model.step(tok, pos).float().clone()
        model.step(tok, pos + 1)
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            logits = model.step(tok, pos)
            tok = logits.argmax(-1)
            pos = pos + 1
        sync(device)
    return (time.perf_counter() - t) / n, first


def time_graph(model: Decoder, n: int) -> tuple[float, torch.Tensor]:
    """Seconds per token of n replays of one captured decode step (token and position advance inside the graph);
    also returns the logits of the replay at position 0."""
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside the capture: compiles kernels, repacks, allocates counters
                model.step(tok, pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = model.step(tok, pos)
            tok.copy_(logits.argmax(-1))
            pos.add_(1)
        tok.zero_()
        pos.zero_()
        g.replay()
        first = logits.float().clone()
        dt = seconds_per_replay(g, n)
    del g
    return dt, first


def seconds_per_replay(g, n: int) -> float:
    """Mean seconds of one replay of CUDA graph ``g`` over ``n`` replays, after one warm-up replay."""
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def time_linears(model: Decoder, n: int) -> float:
    """Seconds per replay of a graph that runs only the step's linears (every decoder linear and lm_head, batch 1)
    on fixed inputs: the part of a decode step that the weight format changes."""
    s = model.s
    dev = model.lm_head.weight.device
    xh = torch.randn(1, s.hidden, dtype=model.lm_head.weight.dtype, device=dev)
    xm = torch.randn(1, s.mlp, dtype=xh.dtype, device=dev)

    def run():
        for b in model.blocks:
            for name in LINEARS:
                b.lin[name](xm if name == "down" else xh)
        model.lm_head(xh)

    with torch.no_grad():
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            run()
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        dt = seconds_per_replay(g, n)
    del g
    return dt


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the table here")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--max-len", type=int, default=None, help="KV buffer positions (default 256; tiny 32)")
    ap.add_argument("--tokens", type=int, default=None, help="timed graph replays (default 128; tiny 8)")
    ap.add_argument("--eager-tokens", type=int, default=None, help="timed eager steps (default 16; tiny 4)")
    ap.add_argument("--m1", default="gemv,slab16,kmajor", help="batch-1 kernels to time for casp (uniform_config)")
    ap.add_argument("--no-mix", action="store_true", help="skip the mixed 2/4-bit variant")
    ap.add_argument("--tuned", default=None, help="JSON of kernel configs from benchmarks/kernels.py --tuned-json")
    args = ap.parse_args()
    tuned_note = "kernel configs: casp/kernels/uniform_config.py TUNED / defaults"
    if args.tuned and os.path.exists(args.tuned):
        n_tuned = uniform_config.load_tuned_json(args.tuned)
        tuned_note = f"kernel configs: {n_tuned} entries of {args.tuned} over the TUNED table"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else LLAVA_7B
    max_len = args.max_len or (32 if args.tiny else 256)
    n_graph = args.tokens or (8 if args.tiny else 128)
    n_eager = args.eager_tokens or (4 if args.tiny else 16)
    graphs = device == "cuda"
    dtype = torch.float16 if device == "cuda" else torch.float32
    m1_list = [m for m in args.m1.split(",") if m] if device == "cuda" else ["torch path"]
    default_m1 = uniform_config.GEMV_M1
    torch.manual_seed(0)
    if device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add synchronization (and fight other jobs)

    head = [
        f"decode at batch 1: {shape} (LLaVA-1.5-7B language model shape{', TINY' if args.tiny else ''}), random "
        f"weights, {dtype}, KV buffer {max_len} positions (read in full every step), greedy",
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}",
        "casp 2-bit: every decoder linear 2-bit group 128 (2.25 bits/weight incl. fp16 scales + zeros); "
        "mix: layers 0,1,30,31 at 4-bit (2.25 avg code bits, 2.5 bits/weight); embedding + lm_head fp16",
        f"eager: {n_eager} Python-loop steps; graph: {n_graph} replays of one captured step; "
        "tokens/s = 1 / time per step; linears: a graph of only the step's 225 linears (the rest of a step, "
        "~25 small kernels per layer, costs the same in every variant)",
        tuned_note,
        "",
        f"{'model':<26} {'kernel@M=1':>10} {'weights GB':>10} {'eager tok/s':>11} {'graph tok/s':>11} "
        f"{'graph ms':>9} {'x fp16 eager':>12} {'x fp16 graph':>12} {'graph GB/s':>10} {'linears ms':>10} "
        f"{'x fp16 lin':>10} {'lin GB/s':>8}",
    ]
    print("\n".join(head), flush=True)
    rows, checks, base = [], [], {}

    def record(name: str, m1: str, model: Decoder) -> None:
        wb = weight_bytes(model)
        te, first_e = time_eager(model, n_eager, device)
        tg, first_g = time_graph(model, n_graph) if graphs else (float("nan"), first_e)
        tl = time_linears(model, n_graph) if graphs else float("nan")
        if not base:
            base.update(eager=te, graph=tg, lin=tl)
        if graphs:
            checks.append(f"{name} [{m1}]: graph vs eager logits at step 0: rel {rel(first_g, first_e):.1e}")
        line = (
            f"{name:<26} {m1:>10} {wb / 1e9:10.2f} {1 / te:11.1f} {1 / tg:11.1f} {1e3 * tg:9.2f} "
            f"{base['eager'] / te:11.2f}x {base['graph'] / tg:11.2f}x {wb / tg / 1e9:10.0f} {1e3 * tl:10.2f} "
            f"{base['lin'] / tl:9.2f}x {wb / tl / 1e9:8.0f}"
        )
        print(line, flush=True)
        rows.append(line)

    t0 = time.time()
    model = Decoder(shape, max_len, dtype, device)
    record("fp16" if device == "cuda" else "fp32 (cpu)", "-", model)
    four_bit = (0, 1, shape.layers - 2, shape.layers - 1)
    variants = [("casp 2-bit g128", lambda i: 2)]
    if not args.no_mix:
        variants.append(("casp mix 2/4-bit g128", lambda i: 4 if i in four_bit else 2))
    for name, bits_of in variants:
        model = Decoder(shape, max_len, dtype, device)  # same seed: same embedding, norms, lm_head
        quantize_random(model, bits_of)
        if device == "cuda":
            torch.cuda.empty_cache()
        for m1 in m1_list:
            if device == "cuda":
                uniform_config.GEMV_M1 = m1
            try:
                record(name, m1, model)
            except Exception as e:  # one kernel failing must not lose the other rows
                msg = f"{name} [{m1}]: FAILED {type(e).__name__}: {str(e)[:300]}"
                print(msg, flush=True)
                rows.append(msg)
        uniform_config.GEMV_M1 = default_m1
        # kernels vs the torch path (dequantized weights, F.linear) on the same step
        with torch.no_grad():
            tok = torch.zeros(1, dtype=torch.long, device=device)
            pos = torch.zeros(1, dtype=torch.long, device=device)
            for m1 in m1_list:
                if device == "cuda":
                    uniform_config.GEMV_M1 = m1
                try:
                    y_k = model.step(tok, pos).float()
                except Exception as e:
                    checks.append(f"{name} [{m1}]: kernel step FAILED {type(e).__name__}")
                    continue
                with dense_weights(model):
                    y_t = model.step(tok, pos).float()
                checks.append(
                    f"{name} [{m1}]: logits vs torch path (dequantized weights): rel {rel(y_k, y_t):.1e}, "
                    f"max abs {float((y_k - y_t).abs().max()):.2e}, same argmax {bool(y_k.argmax() == y_t.argmax())}"
                )
            uniform_config.GEMV_M1 = default_m1
        del model
    tail = ["", "checks:"] + ["  " + c for c in checks] + [f"total {time.time() - t0:.0f}s"]
    print("\n".join(tail), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(head + rows + tail) + "\n")


if __name__ == "__main__":
    main()
