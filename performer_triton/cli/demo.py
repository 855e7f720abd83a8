"""`performer-triton demo`: train a small causal, leak-free PerformerLM on text, then sample from it.

The default corpus is the source of a few modules of Python's standard library (always present,
no download), with each indentation level written as one space instead of four and blank lines
dropped, so that the bytes the model learns are mostly identifiers, keywords and punctuation
rather than runs of spaces.  Bytes are tokens (vocabulary 256); the loss is shown in bits per
byte (8 = uniform over the 256 byte values).  Training stops after --steps steps or --seconds
seconds, whichever comes first, so the demo fits in about two minutes on a 2-core CPU.  The exit
code is 0 when the smoothed loss fell, else 1, with a line on stderr saying so.

Generation uses the cached decoder (AutoregressiveWrapper.generate(use_cache=True)): each new token
updates per-layer recurrent state in O(1).  The same sample is then generated again by recomputing
the whole prefix each token (what performer-pytorch 1.1.4 does) and both speeds are printed, at
the same context length.
"""
from __future__ import annotations

import inspect
import math
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from performer_triton import AutoregressiveWrapper, PerformerLM

from .arguments import float_at_least, int_in, memory_problem, positive_float, positive_int, readable_file

DEFAULT_MODULES = ("argparse", "collections", "dataclasses", "functools", "pathlib", "textwrap", "typing")
DEFAULTS = {  # device type -> (training steps, time budget in seconds; None: no budget)
    "cpu": (3000, 75.0),
    "cuda": (3000, 100.0),
}
PROMPT_LEN = 64  # the prompt is min(PROMPT_LEN, seq_len // 4) bytes
MIN_SEQ_LEN = 4  # a prompt of at least one byte
VOCAB = 256  # bytes
MIN_CORPUS_BYTES = 1024


def collapse_indentation(text: str, width: int = 4) -> str:
    """Each indentation level (`width` spaces or a tab) as one space; blank lines and separator
    comments (a run of one repeated symbol, such as `# =====`) dropped."""
    text = re.sub(r"(?m)^[ \t]*#+[ \t]*([=\-#*~_])\1{4,}[ \t]*$", "", text)
    text = re.sub(r"(?m)^[ \t]+", lambda m: " " * (len(m.group(0).expandtabs(width)) // width), text)
    return re.sub(r"\n(?:[ \t]*\n)+", "\n", text)


def default_corpus() -> bytes:
    """Concatenated source text of some standard-library modules, indentation collapsed."""
    import importlib

    texts = [inspect.getsource(importlib.import_module(name)) for name in DEFAULT_MODULES]
    return collapse_indentation("\n".join(texts)).encode("utf-8")


def load_corpus(path: str | None) -> bytes:
    return default_corpus() if path is None else Path(path).read_bytes()


def corpus_problem(data: bytes, path: str | None, seq_len: int) -> str | None:
    """Why the corpus cannot train windows of seq_len + 1 bytes (None when it can)."""
    need = max(MIN_CORPUS_BYTES, seq_len + 2)
    if len(data) >= need:
        return None
    source = path if path is not None else "the default corpus"
    return (f"{source} has {len(data):,} bytes, need at least {MIN_CORPUS_BYTES:,} and more than "
            f"--seq-len + 1 = {seq_len + 1:,}")


def validate(args, parser) -> None:
    """Checks across arguments, after parsing (a bad one is a parser error): the corpus must hold
    more than one training window.  Keeps the corpus read in args.corpus."""
    data = load_corpus(args.text)
    problem = corpus_problem(data, args.text, args.seq_len)
    if problem is not None:
        flag = "--text" if args.text is not None and len(data) < MIN_CORPUS_BYTES else "--seq-len"
        parser.error(f"argument {flag}: {problem}")
    # the fp32 logits of a training step and their gradient alone: a lower bound
    problem = memory_problem(2 * args.batch_size * args.seq_len * VOCAB * 4,
                             "cuda" if torch.cuda.is_available() else "cpu",
                             f"the logits of one training step at --batch-size {args.batch_size} --seq-len {args.seq_len}")
    if problem is not None:
        parser.error(f"argument --batch-size: {problem}")
    args.corpus = data


def build_model(seq_len: int, device: torch.device):
    model = PerformerLM(
        num_tokens=VOCAB,
        max_seq_len=seq_len,
        dim=128,
        depth=2,
        heads=4,
        dim_head=32,
        causal=True,
        nb_features=64,
        feature_redraw_interval=100_000,  # fixed features: the cached decoder reads them
        key_stabilizer="prefix",  # leak-free: position i sees only positions <= i (and caches exactly)
        shift_tokens=True,  # half of each layer's channels see the previous byte: faster learning
    )
    return AutoregressiveWrapper(model).to(device)


class ThreadPicker:
    """CPU threads for training.  Ops this small gain little from a second thread, and when other
    processes share the cores, torch's intra-op threads wait on each other and a step takes several
    times longer than on one thread.  Unless --threads is given, the first steps are timed with
    torch's default thread count and with one thread, and training goes on with the faster (the
    timed steps train the model like any other)."""

    PLAN = ("warmup", "default", "default", "one", "one")

    def __init__(self, threads: int | None):
        self.default = torch.get_num_threads()
        self.fixed = threads
        self.times: dict[str, list[float]] = {"default": [], "one": []}
        self.step = 0
        self.chosen: int | None = None
        self.t0 = 0.0
        if threads is not None:
            torch.set_num_threads(threads)
            self.chosen = threads
        elif self.default == 1:
            self.chosen = 1

    def _phase(self) -> str | None:
        return self.PLAN[self.step] if self.chosen is None and self.step < len(self.PLAN) else None

    def before_step(self) -> None:
        phase = self._phase()
        if phase is not None:
            torch.set_num_threads(1 if phase == "one" else self.default)
            self.t0 = time.perf_counter()

    def after_step(self) -> None:
        phase = self._phase()
        if phase is None:
            return
        if phase != "warmup":
            self.times[phase].append(time.perf_counter() - self.t0)
        self.step += 1
        if self.step == len(self.PLAN):
            one, default = min(self.times["one"]), min(self.times["default"])
            self.chosen = 1 if one < default else self.default
            torch.set_num_threads(self.chosen)

    def report(self) -> str:
        if self.fixed is not None or not self.times["one"]:
            return f"; {torch.get_num_threads()} CPU thread(s)" if self.fixed is not None else ""
        one, default = min(self.times["one"]), min(self.times["default"])
        return (f"; {self.chosen} CPU thread(s), the faster here "
                f"({default:.2f} s/step on {self.default}, {one:.2f} s/step on 1)")


def bits(nats: float) -> float:
    return nats / math.log(2)


def text_of(tokens: torch.Tensor) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


def run(args) -> int:
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # as it was (the demo may have picked fewer)


def _run(args) -> int:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_steps, default_seconds = DEFAULTS[device.type]
    steps = args.steps if args.steps is not None else default_steps
    budget = args.seconds if args.seconds is not None else (None if args.steps is not None else default_seconds)
    corpus = getattr(args, "corpus", None)  # read by validate()
    corpus = load_corpus(args.text) if corpus is None else corpus
    seq_len, batch = args.seq_len, args.batch_size
    problem = corpus_problem(corpus, args.text, seq_len)
    if problem is not None:
        raise ValueError(problem)
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    model = build_model(seq_len, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    limit = f"{steps} steps" + (f" or {budget:g} s, whichever comes first" if budget else "")
    print(f"device {device}; corpus {data.numel():,} bytes; leak-free causal PerformerLM, {n_params / 1e6:.2f}M "
          f"parameters; batches of {batch} x {seq_len} bytes; training for {limit}", flush=True)

    def batch_of(n: int) -> torch.Tensor:
        starts = torch.randint(0, data.numel() - seq_len - 1, (n,))
        return torch.stack([data[s : s + seq_len + 1] for s in starts]).to(device)

    threads = ThreadPicker(args.threads if device.type == "cpu" else None)
    first = last = None
    tokens, done, t0 = 0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step")
    for _ in bar:
        threads.before_step()
        # the learning rate falls linearly to a tenth over the run (steps or seconds, whichever is nearer)
        progress = max(done / steps, (time.perf_counter() - t0) / budget if budget else 0.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * max(0.1, 1.0 - 0.9 * progress)
        model.train()
        loss = model(batch_of(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        tokens += batch * seq_len
        done += 1
        threads.after_step()
        value = bits(loss.item())
        first = value if first is None else first
        last = value if last is None else 0.9 * last + 0.1 * value
        bar.set_postfix(bits_per_byte=f"{last:.2f}", tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
        if budget is not None and time.perf_counter() - t0 > budget:
            break
    bar.close()
    elapsed = time.perf_counter() - t0
    why = f" (the {budget:g} s budget; --steps and --seconds change it)" if done < steps else ""
    print(f"trained {done} steps in {elapsed:.0f} s{why}, {tokens / elapsed:,.0f} bytes/s{threads.report()}")
    print(f"loss: start {first:.2f} -> end {last:.2f} bits per byte (smoothed; 8 = uniform)")

    model.eval()
    prompt_len = min(PROMPT_LEN, seq_len // 4)
    generate = max(0, min(args.generate, seq_len - prompt_len))  # the whole sample within the trained context
    prompt = batch_of(1)[:, :prompt_len]
    speeds, samples = {}, {}
    for use_cache in (True, False):
        torch.manual_seed(args.seed + 1)  # the same random draws for both
        start = time.perf_counter()
        samples[use_cache] = model.generate(prompt, generate, temperature=args.temperature, use_cache=use_cache)
        speeds[use_cache] = generate / max(time.perf_counter() - start, 1e-9)
    print(f"--- prompt ({prompt_len} bytes of the corpus) ---\n{text_of(prompt[0])}")
    print(f"--- sample ({generate} bytes, temperature {args.temperature}, cached decoding) ---\n{text_of(samples[True][0])}")
    print("---")
    same = ("the same tokens" if torch.equal(samples[True], samples[False])
            else "different tokens (a rounding difference changed a draw)")
    print(f"generation, context {prompt_len} -> {prompt_len + generate} tokens: cached decoding "
          f"{speeds[True]:,.0f} tokens/s, recomputing the prefix (performer-pytorch 1.1.4) {speeds[False]:,.0f} "
          f"tokens/s ({speeds[True] / speeds[False]:.1f}x); {same}")
    if last < first:
        return 0
    print(f"performer-triton demo: exit code 1: the loss did not fall (start {first:.2f} -> end {last:.2f} bits "
          f"per byte in {done} step(s)); train longer with --steps or --seconds", file=sys.stderr)
    return 1


def add_arguments(parser) -> None:
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    parser.add_argument("--text", type=readable_file, default=None,
                        help=f"a text file to train on, at least {MIN_CORPUS_BYTES} bytes and more than seq-len + 1 "
                             f"(default: Python standard-library source, indentation collapsed)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"training steps (default: {cpu[0]} on CPU, {cuda[0]} on CUDA)")
    parser.add_argument("--seconds", type=positive_float, default=None,
                        help=f"stop training after this many seconds (default, unless --steps is given: "
                             f"{cpu[1]:.0f} on CPU, {cuda[1]:.0f} on CUDA)")
    parser.add_argument("--seq-len", type=int_in(MIN_SEQ_LEN), default=256,
                        help=f"training window and the model's max_seq_len (at least {MIN_SEQ_LEN})")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--lr", type=positive_float, default=1e-2,
                        help="peak learning rate (falls linearly to a tenth)")
    parser.add_argument("--generate", type=positive_int, default=192,
                        help=f"bytes to sample after a prompt of min({PROMPT_LEN}, seq-len // 4) bytes of the corpus "
                             f"(at most seq-len minus the prompt: the sample stays within the trained context)")
    parser.add_argument("--temperature", type=float_at_least(0.0, expected="a finite number >= 0 (0 = greedy)"),
                        default=0.7, help="sampling temperature (0: greedy)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for training (default: torch's default or 1, whichever trains faster "
                             "in the first steps)")
    parser.add_argument("--seed", type=int_in(-2**63, 2**64 - 2, expected="an integer from -2**63 to 2**64 - 2"),
                        default=0)
    parser.set_defaults(validate=lambda args: validate(args, parser))  # called by cli.main after parsing
