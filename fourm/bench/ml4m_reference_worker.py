"""PyTorch ml-4m, timed at fourm-bench's shapes: the reference side of a same-run comparison.

    /path/to/venv/bin/python fourm/bench/ml4m_reference_worker.py --ml4m_src /path/to/ml-4m

A standalone script for ANOTHER interpreter (a scratch venv with torch and ml-4m's dependencies,
docs/benchmarks.md): it imports neither fourm (the project) nor jax. ml-4m's own package is also
called `fourm`; it is imported from --ml4m_src, which goes first on sys.path. fourm-bench
(fourm.bench.reference) starts it once per benchmark group and speaks JSON lines over
stdin/stdout, one request, one answer:

    {"op": "build", "key": "tiny", "model": {...}, "batch": {...}, "train": {...}}
        -> {"ok": true, "params": ..., "mlp_hidden": ...}
    {"op": "time", "key": "tiny", "figure": "fwd", "iters": 3, "warmup": 1, "args": {...}}
        -> {"ok": true, "times": [s, ...], "cpu": [s, ...], "first_s": s, "faults": n, "calls": n}
    {"op": "free", "key": "tiny"} / {"op": "quit"}

Figures: fwd (loss, no grad), fwd_bwd (loss + backward), train_step (fwd_bwd + clip + AdamW with
4M's parameter groups), maskgit (RGB -> tok_depth through GenerationSampler.generate), caption
(RGB + depth -> caption, autoregressive). The first line it writes is a hello with versions and
thread settings. Everything else it prints (ml-4m prints) goes to stderr: stdout is the protocol.

Two environment workarounds, as for the parity fixtures: ml-4m's fm.py calls
random.sample(dict.items(), n), which Python >= 3.11 rejects (its module gets a `random` whose
sample takes a list of the view; same draws); and --keep_freed_memory applies the same glibc
malloc options as fourm.hostmem (off by default: ml-4m as its users run it).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import io
import os
import random
import resource
import sys
import time
import traceback

IMAGE_MODS = ("tok_rgb@224", "tok_depth@224")


def keep_freed_memory() -> bool:
    """glibc: one arena, no mmap'd blocks, no trimming (fourm.hostmem's settings, copied by value
    because this script must not import the project)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(p, v) == 1 for p, v in ((-8, 1), (-4, 0), (-1, 2**31 - 1)))


class _ListSample:
    """`random` for ml-4m's fm.py: sample() of a dict view as of a list (Python >= 3.11)."""

    def __getattr__(self, name):
        return getattr(random, name)

    @staticmethod
    def sample(population, k, **kw):
        return random.sample(list(population), k, **kw)


def import_ml4m(src: str):
    sys.path.insert(0, os.path.abspath(src))
    import fourm.models.fm as fm_module  # ml-4m's package: the path above goes first
    from fourm.data.modality_info import MODALITY_INFO
    from fourm.models import generate

    where = os.path.abspath(fm_module.__file__)  # ml-4m's `fourm` is a namespace package
    if not where.startswith(os.path.abspath(src)):
        raise RuntimeError(f"--ml4m_src {src}: `fourm` was imported from {where}, not from ml-4m's tree "
                           "(unset PYTHONPATH)")
    fm_module.random = _ListSample()
    return fm_module, MODALITY_INFO, generate


class Worker:
    def __init__(self, torch, fm_module, modality_info, generate, src: str):
        self.torch, self.fm, self.info, self.gen = torch, fm_module, modality_info, generate
        self.src, self.models, self._text = src, {}, None

    # ------------------------------------------------------------------ build
    def build(self, key, model, batch=None, train=None, seed=0):
        torch = self.torch
        torch.manual_seed(seed)
        cfg = dict(act_layer="SiLU", gated_mlp=True, mlp_bias=False, qkv_bias=False, proj_bias=False,
                   norm_bias=False, qk_norm=False, decoder_causal_mask=False, decoder_sep_mask=True,
                   share_modality_embeddings=True, num_register_tokens=0, drop_path_rate_encoder=0.0,
                   drop_path_rate_decoder=0.0, shared_drop_path=False, use_act_checkpoint=False,
                   image_size=224, patch_size=16, mlp_ratio=4.0,
                   domains_in=["rgb@224", "tok_rgb@224", "tok_depth@224", "caption"],
                   domains_out=["tok_rgb@224", "tok_depth@224", "caption"])
        cfg.update(model)
        self.models.pop(key, None)  # free the old one first: base next to tiny is wasted memory
        net = self.fm.FM(config=cfg)
        entry = dict(net=net)
        if batch:  # generation needs none
            entry.update(batch=self._batch(batch, seed), n_in=int(batch["input_tokens"]),
                         n_tgt=int(batch["target_tokens"]))
        if train:
            entry["opt"] = self._optimizer(net, train)
            entry["clip"] = float(train.get("clip_grad") or 0.0)
        self.models[key] = entry
        hidden = net.encoder[0].mlp.fc1.out_features
        return dict(params=sum(p.numel() for p in net.parameters()), mlp_hidden=hidden,
                    dim=cfg["dim"], encoder_depth=len(net.encoder), decoder_depth=len(net.decoder))

    def _optimizer(self, net, t):
        from fourm.utils.optim_factory import get_parameter_groups  # 4M's decay / no-decay split

        skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") else {}
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every group's parameter names
            groups = get_parameter_groups(net, float(t["weight_decay"]), skip)
        return self.torch.optim.AdamW(groups, lr=float(t["lr"]), betas=tuple(t["betas"]), eps=float(t["eps"]))

    def _batch(self, b, seed):
        """4M's mod_dict with exactly the token counts per sample and modality that fourm's batch
        has (fourm.bench.reference.batch_counts): same encoder and decoder work on both sides."""
        torch, rng = self.torch, random.Random(seed)
        B, enc, dec = int(b["size"]), b["enc_counts"], b["dec_counts"]
        out = {"rgb@224": dict(tensor=torch.randn(B, 3, 224, 224), input_mask=torch.ones(B, 196, dtype=torch.bool),
                               target_mask=torch.ones(B, 196, dtype=torch.bool),
                               decoder_attention_mask=torch.zeros(B, 196, dtype=torch.int64))}
        for s, c in enumerate(enc.get("rgb@224", [0] * B)):
            out["rgb@224"]["input_mask"][s, rng.sample(range(196), c)] = False
        for mod in IMAGE_MODS:
            vocab = self.info[mod]["vocab_size"]
            d = dict(tensor=torch.randint(0, vocab, (B, 196)), input_mask=torch.ones(B, 196, dtype=torch.bool),
                     target_mask=torch.ones(B, 196, dtype=torch.bool),
                     decoder_attention_mask=torch.zeros(B, 196, dtype=torch.int64))
            for s in range(B):  # inputs and targets drawn independently, as fourm's synthetic batch
                d["input_mask"][s, rng.sample(range(196), enc.get(mod, [0] * B)[s])] = False
                pos = sorted(rng.sample(range(196), dec.get(mod, [0] * B)[s]))
                d["target_mask"][s, pos] = False
                if pos:  # 4M's compressed form: the first target attends to all n of its modality
                    d["decoder_attention_mask"][s, pos[0]] = len(pos)
            out[mod] = d
        L = self.info["caption"]["max_tokens"]
        d = dict(tensor=torch.randint(10, self.info["caption"]["vocab_size"], (B, L)),
                 input_mask=torch.ones(B, L, dtype=torch.bool), target_mask=torch.ones(B, L, dtype=torch.bool),
                 decoder_attention_mask=torch.zeros(B, L, dtype=torch.int64))
        for s in range(B):
            ci, ct = enc.get("caption", [0] * B)[s], dec.get("caption", [0] * B)[s]
            d["input_mask"][s, :ci] = False
            if ct:  # ct + 1 unmasked positions give ct decoder slots (4M shifts targets left)
                start = min(ci, L - ct - 1)
                d["target_mask"][s, start:start + ct + 1] = False
                d["decoder_attention_mask"][s, start:start + ct + 1] = 1  # causal within the span
        out["caption"] = d
        return out

    # ------------------------------------------------------------------ figures
    def call(self, key, figure, args):
        m = self.models.get(key)
        if m is None:
            raise ValueError(f"no model {key!r} built (have {sorted(self.models)})")
        torch, net = self.torch, m["net"]
        if figure in ("fwd", "fwd_bwd", "train_step") and "batch" not in m:
            raise ValueError(f"model {key!r} was built without a 'batch'")
        if figure == "fwd":
            net.train()

            def fwd():
                with torch.no_grad():
                    return net(m["batch"], num_encoder_tokens=m["n_in"], num_decoder_tokens=m["n_tgt"])[0]
            return fwd
        if figure in ("fwd_bwd", "train_step"):
            net.train()
            if figure == "train_step" and "opt" not in m:
                raise ValueError(f"model {key!r} was built without 'train' settings")

            def step():
                net.zero_grad(set_to_none=True)
                loss = net(m["batch"], num_encoder_tokens=m["n_in"], num_decoder_tokens=m["n_tgt"])[0]
                loss.backward()
                if figure == "train_step":
                    if m["clip"] > 0:
                        torch.nn.utils.clip_grad_norm_(net.parameters(), m["clip"])
                    m["opt"].step()
                return loss
            return step
        if figure == "maskgit":
            return self._maskgit(net, args)
        if figure == "caption":
            return self._caption(net, args)
        raise ValueError(f"unknown figure {figure!r}; known: fwd, fwd_bwd, train_step, maskgit, caption")

    def _full(self, mod_dict, mod, tensor):
        mod_dict[mod] = dict(tensor=tensor)
        return self.gen.init_full_input_modality(mod_dict, self.info, mod, "cpu")

    def _maskgit(self, net, a):
        torch, g = self.torch, self.gen
        B = int(a.get("batch", 1))
        cond = self._full({}, "rgb@224", torch.randn(B, 3, 224, 224))
        cond = g.init_empty_target_modality(cond, self.info, "tok_depth@224", B, 196, "cpu")
        sched = g.build_chained_generation_schedules(
            cond_domains=["rgb@224"], target_domains=["tok_depth@224"], tokens_per_target=[196],
            autoregression_schemes=["maskgit"], decoding_steps=[int(a.get("steps", 8))],
            token_decoding_schedules=[a.get("schedule", "cosine")], temps=[float(a.get("temperature", 0.0))],
            temp_schedules=["constant"], cfg_scales=[1.0], cfg_schedules=["constant"])
        sampler = g.GenerationSampler(net).eval()
        return lambda: sampler.generate(cond, sched, seed=0)["tok_depth@224"]["tensor"]

    def _caption(self, net, a):
        torch, g = self.torch, self.gen
        B, n = int(a.get("batch", 1)), int(a.get("tokens", 20))
        cond = self._full({}, "rgb@224", torch.randn(B, 3, 224, 224))
        cond = self._full(cond, "tok_depth@224", torch.randint(0, self.info["tok_depth@224"]["vocab_size"], (B, 196)))
        cond = g.init_empty_target_modality(cond, self.info, "caption", B, n + 1, "cpu")
        sched = g.build_chained_generation_schedules(
            cond_domains=["rgb@224", "tok_depth@224"], target_domains=["caption"], tokens_per_target=[n],
            autoregression_schemes=["autoregressive"], decoding_steps=[1], token_decoding_schedules=["linear"],
            temps=[float(a.get("temperature", 0.0))], temp_schedules=["constant"], cfg_scales=[1.0],
            cfg_schedules=["constant"])
        sampler, text = g.GenerationSampler(net).eval(), self.text_tokenizer()
        return lambda: sampler.generate(cond, sched, text_tokenizer=text, seed=0)["caption"]["tensor"]

    def text_tokenizer(self):
        if self._text is None:
            from tokenizers import Tokenizer

            self._text = Tokenizer.from_file(os.path.join(
                self.src, "fourm/utils/tokenizer/trained/text_tokenizer_4m_wordpiece_30k.json"))
        return self._text

    def time(self, key, figure, iters, warmup=1, args=None):
        fn = self.call(key, figure, args or {})
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        for _ in range(max(int(warmup) - 1, 0)):
            fn()
        times, cpu, out = [], [], None
        for _ in range(int(iters)):
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        return dict(times=times, cpu=cpu, first_s=first, faults=faults, calls=int(iters) + max(int(warmup), 1),
                    output_shape=list(getattr(out, "shape", ())))


def hello(torch, args) -> dict:
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                      "KMP_BLOCKTIME", "GLIBC_TUNABLES") if k in os.environ}
    return dict(torch=torch.__version__, python=sys.version.split()[0], threads=torch.get_num_threads(),
                interop_threads=torch.get_num_interop_threads(), env=env, pid=os.getpid(),
                keep_freed_memory=args.keep_freed_memory, ml4m_src=os.path.abspath(args.ml4m_src),
                parallel_info=torch.__config__.parallel_info().splitlines()[:8])


def serve(worker: Worker, proto_in, proto_out) -> int:
    def answer(d):
        proto_out.write(json.dumps(d) + "\n")
        proto_out.flush()

    for line in proto_in:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.pop("op", None)
            if op == "quit":
                answer(dict(ok=True))
                return 0
            if op == "build":
                answer(dict(ok=True, **worker.build(**req)))
            elif op == "time":
                answer(dict(ok=True, **worker.time(**req)))
            elif op == "free":
                worker.models.pop(req.get("key"), None)
                answer(dict(ok=True))
            else:
                answer(dict(ok=False, error=f"unknown op {op!r}; known: build, time, free, quit"))
        except Exception as e:  # noqa: BLE001 - the error goes back to the bench, the worker stays up
            traceback.print_exc(file=sys.stderr)
            answer(dict(ok=False, error=f"{type(e).__name__}: {e}"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ml4m_src", required=True, help="a work tree of apple/ml-4m (its `fourm` package)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--interop_threads", type=int, default=0, help="torch.set_num_interop_threads (0 = default)")
    p.add_argument("--keep_freed_memory", action="store_true", help="glibc keeps freed memory (as fourm's workers)")
    args = p.parse_args(argv)
    # The protocol owns the real stdout; anything printed (ml-4m prints) goes to stderr.
    proto_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if not os.path.isdir(os.path.join(args.ml4m_src, "fourm", "models")):
        proto_out.write(json.dumps(dict(ok=False, error=f"--ml4m_src {args.ml4m_src}: no fourm/models folder "
                                        "(expected a work tree of apple/ml-4m)")) + "\n")
        return 2
    if args.keep_freed_memory:
        keep_freed_memory()  # before torch starts its thread pools
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.interop_threads:
            torch.set_num_interop_threads(args.interop_threads)
        fm_module, info, generate = import_ml4m(args.ml4m_src)
    except Exception as e:  # noqa: BLE001 - reported to the bench as one line
        traceback.print_exc(file=sys.stderr)
        proto_out.write(json.dumps(dict(ok=False, error=f"starting the reference: {type(e).__name__}: {e}")) + "\n")
        return 2
    proto_out.write(json.dumps(dict(ok=True, hello=hello(torch, args))) + "\n")
    proto_out.flush()
    return serve(Worker(torch, fm_module, info, generate, args.ml4m_src), sys.stdin, proto_out)


if __name__ == "__main__":
    sys.exit(main())
