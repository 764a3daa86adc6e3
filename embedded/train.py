"""``hasten train-embedded``: train the embedded digit model (a tiny diffusers WanPipeline) from scratch.

Seeded and CPU-friendly: a 2x-downsampling AutoencoderKLWan is trained first, then a WanTransformer3DModel
learns rectified flow (velocity = noise - data, Wan's convention) on its normalised latents, conditioned
on a frozen random UMT5 encoder's embedding of "digit N" (with prompt dropout to "" for CFG).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import augment, load_real_digits

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PROMPTS = [f"digit {n}" for n in range(10)]
MAX_SEQUENCE_LENGTH = 512  # WanPipeline pads every prompt embedding to this many tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import nonneg_float, nonneg_int, positive_int

    parser.add_argument("--out", type=Path, default=None,
                        help="output folder in diffusers layout (default: ./embedded-weights; with --eval-only: "
                             "the shipped weights)")
    parser.add_argument("--video", action="store_true",
                        help="train the moving-digit video model instead (its options: hasten train-embedded --video --help)")
    parser.add_argument("--overwrite-shipped", action="store_true",
                        help="allow --out to be the weights shipped inside the package (replaces them)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--vae-steps", type=positive_int, default=500)
    parser.add_argument("--vae-batch", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=3000, help="transformer training steps")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--lr", type=nonneg_float, default=1e-3)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--head-dim", type=positive_int, default=32)
    parser.add_argument("--ffn", type=positive_int, default=512)
    parser.add_argument("--dropout", type=nonneg_float, default=0.12, help="probability of training on the empty prompt")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-samples", type=positive_int, default=10, help="samples per digit in the final check")
    parser.add_argument("--eval-only", action="store_true",
                        help="do not train: re-score the weights in --out at the current defaults and update the record")


# ----------------------------------------------------------------------------------------------- build
def build_tokenizer():
    """A word-level tokenizer over the 13 words the prompts use, loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "digit": 3, **{str(n): 4 + n for n in range(10)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_components(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(args.seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=16, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ).eval().requires_grad_(False)
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        scale_factor_spatial=2, scale_factor_temporal=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=64, ffn_dim=args.ffn, num_layers=args.layers,
        rope_max_seq_len=64,
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, num_train_timesteps=1000,
    )
    return {"tokenizer": build_tokenizer(), "text_encoder": text_encoder, "vae": vae,
            "transformer": transformer, "scheduler": scheduler}


def _to_vae(x: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) in [0,1] -> (B,3,1,H,W) in [-1,1], the layout AutoencoderKLWan expects."""
    return (x * 2 - 1).repeat(1, 3, 1, 1).unsqueeze(2)


# ------------------------------------------------------------------------------------------------- VAE
def vae_train_step(vae: Any, x: torch.Tensor, opt: Any, sched: Any) -> tuple[float, float]:
    """One VAE step (image or video): reconstruction MSE + 0.5 L1 plus 2e-4 KL, gradients clipped at 1.

    Returns the step's reconstruction MSE and KL per element, for the log.
    """
    post = vae.encode(x).latent_dist
    out = vae.decode(post.sample()).sample
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    loss = F.mse_loss(out, x) + 0.5 * F.l1_loss(out, x) + 2e-4 * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    sched.step()
    return F.mse_loss(out.detach(), x).item(), kl.item()


def train_vae(vae, images: torch.Tensor, args: argparse.Namespace, log) -> dict[str, float]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(args.vae_steps, 1), pct_start=0.1)
    vae.train()
    rec = kl = 0.0
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=gen)
        x = _to_vae(augment(images[idx], gen))
        m, kl = vae_train_step(vae, x, opt, sched)
        rec = 0.9 * rec + 0.1 * m if step else m
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d}  mse {rec:.5f}  kl/elem {kl:.3f}")
    vae.eval()
    return {"vae_mse": rec, "vae_kl_per_element": kl}


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, labels: torch.Tensor, copies: int, seed: int):
    """Posterior means of ``copies`` augmented versions of every digit (the first copy unaugmented)."""
    gen = torch.Generator().manual_seed(seed + 2)
    zs, ys = [], []
    for c in range(copies):
        x = images if c == 0 else augment(images, gen)
        for i in range(0, len(x), 256):
            zs.append(vae.encode(_to_vae(x[i : i + 256])).latent_dist.mean)
        ys.append(labels)
    return torch.cat(zs), torch.cat(ys)


# ----------------------------------------------------------------------------------------- transformer
class _PaddedTextProcessor:
    """Training-only cross-attention that folds the trailing all-zero padding rows into one key.

    WanPipeline pads prompt embeddings with zeros to 512 tokens; those rows give identical keys and
    values, so attending to ``n`` copies equals attending to one copy with logit + log(n). Exact, ~3x faster.
    """

    def __init__(self, base, bias: torch.Tensor) -> None:
        self.base = base
        self.bias = bias

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask=self.bias, rotary_emb=rotary_emb)


def _fold_padding(transformer, embeds: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Short text embeddings + processors with the multiplicity bias; returns (short embeds, old processors)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    used = int((embeds.abs().sum(-1) > 0).sum(-1).max())
    short = torch.cat([embeds[:, :used], embeds.new_zeros(embeds.shape[0], 1, embeds.shape[-1])], dim=1)
    bias = torch.zeros(1, 1, 1, used + 1)
    bias[..., -1] = math.log(embeds.shape[1] - used)
    old = []
    for block in transformer.blocks:
        old.append(block.attn2.processor)
        block.attn2.set_processor(_PaddedTextProcessor(WanAttnProcessor(), bias))
    return short, old


def train_transformer(transformer, latents, labels, embeds, uncond, args, log) -> dict[str, float]:
    """Rectified flow: x_t = (1 - s) z + s e, target v = e - z, timestep = 1000 s, s ~ logit-normal."""
    gen = torch.Generator().manual_seed(args.seed + 3)
    table = torch.cat([embeds, uncond])  # rows 0..9 = digits, row 10 = ""
    short, old = _fold_padding(transformer, table)
    ema = [p.detach().clone() for p in transformer.parameters()]
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    transformer.train()
    avg = None
    for step in range(args.steps):
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        z = latents[idx]
        cls = labels[idx].clone()
        cls[torch.rand(args.batch, generator=gen) < args.dropout] = 10
        u = torch.randn(args.batch, generator=gen)
        sigma = torch.where(torch.rand(args.batch, generator=gen) < 0.1, torch.rand(args.batch, generator=gen),
                            torch.sigmoid(u)).clamp(1e-3, 1.0)
        noise = torch.randn(z.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * z + s * noise
        pred = transformer(xt, sigma * 1000, short[cls], return_dict=False)[0]
        loss = F.mse_loss(pred, noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, transformer.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            log(f"transformer step {step:5d}  loss {avg:.4f}  lr {sched.get_last_lr()[0]:.2e}")
    with torch.no_grad():
        for e, p in zip(ema, transformer.parameters()):
            p.copy_(e)
    for block, proc in zip(transformer.blocks, old):
        block.attn2.set_processor(proc)
    transformer.eval()
    return {"flow_loss": float(avg or 0.0)}


# ------------------------------------------------------------------------------------------------- run
def portable_tokenizer_class(out: Path) -> None:
    """Name the tokenizer ``PreTrainedTokenizerFast`` (transformers 5 writes its new alias
    ``TokenizersBackend``, which transformers 4 cannot load); both versions resolve the old name."""
    for path, key in ((out / "model_index.json", "tokenizer"), (out / "tokenizer" / "tokenizer_config.json", None)):
        data = json.loads(path.read_text())
        if key is None:
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        else:
            data[key] = ["transformers", "PreTrainedTokenizerFast"]
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_report(record: dict[str, Any], out: Path) -> None:
    """TRAINING.md: the human-readable twin of TRAINING.json."""
    m, s, p = record["metrics"], record["settings"], record["params"]
    per = " ".join(f"{k}:{v:.0%}" for k, v in sorted(m["per_class"].items(), key=lambda kv: int(kv[0])))
    text = f"""# Embedded digit model: training record

Reproduce: `hasten train-embedded` (CPU, {s["threads"]} thread(s), seed {s["seed"]}).

- Settings: {json.dumps(s)}
- Parameters: transformer {p["transformer"]:,}, VAE {p["vae"]:,}, text encoder {p["text_encoder"]:,} (frozen, random)
- Weights on disk: {record["weights_bytes"] / 1e6:.2f} MB (safetensors)
- Training time: VAE {record["time_s"]["vae"]} s, total {record["time_s"]["total_training"]} s ({record["torch"]})
- VAE reconstruction MSE (in [-1, 1]) {m["vae_mse"]:.5f}; final flow-matching loss {m["flow_loss"]:.4f}
- Sampler: {record["sampler"]["steps"]} steps, guidance {record["sampler"]["guidance"]}, {record["sampler"]["size"]}x{record["sampler"]["size"]}
- Prompted-digit accuracy on {m["samples"]} samples: {m["accuracy"]:.1%}; per class {per}
- Fréchet distance to real digits (classifier features): {m["frechet"]:.3f}
"""
    (out / "TRAINING.md").write_text(text)


def evaluate_saved(out: Path, per_class: int) -> dict[str, Any]:
    """Score the saved weights at the shipped sampler defaults (DEFAULT_STEPS / DEFAULT_GUIDANCE)."""
    from . import load_embedded
    from .evaluate import evaluate_digits

    return evaluate_digits(load_embedded(path=out), per_class=per_class, seed=1234)


def _sampler_defaults() -> dict[str, Any]:
    from . import DEFAULT_GUIDANCE, DEFAULT_SIZE, DEFAULT_STEPS

    return {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "size": DEFAULT_SIZE}


def rescore(out: Path, per_class: int) -> int:
    """--eval-only: refresh the metrics of an existing TRAINING.json without retraining."""
    record = json.loads((out / "TRAINING.json").read_text())
    t0 = time.perf_counter()
    ev = evaluate_saved(out, per_class)
    record["sampler"] = _sampler_defaults()
    record["sampler"]["flow_shift"] = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["flow_shift"]
    record["metrics"].update(ev)
    record["eval_time_s"] = round(time.perf_counter() - t0, 1)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(record, out)
    print(f"accuracy {ev['accuracy']:.3f} per class {ev['per_class']} frechet {ev['frechet']:.3f}")
    return 0


def run(args: argparse.Namespace) -> int:
    from diffusers import WanPipeline

    from ..cli import UserError, writable_dir

    torch.set_num_threads(args.threads)
    if args.eval_only:
        return rescore(args.out or WEIGHTS_DIR, args.eval_samples)
    out = Path(args.out or "embedded-weights")
    if out.resolve() == WEIGHTS_DIR.resolve() and not args.overwrite_shipped:
        raise UserError(f"--out {out} is the shipped weights folder; training would replace them. "
                        "Pass another --out, or --overwrite-shipped if that is what you want.")
    writable_dir(out)
    print(f"training into {out.resolve()}", flush=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lines: list[str] = []

    def log(msg: str) -> None:
        msg = f"[{time.perf_counter() - t0:7.1f}s] {msg}"
        print(msg, flush=True)
        lines.append(msg)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    settings.pop("out", None)
    log(f"settings {json.dumps(settings)}")
    comp = build_components(args)
    images, labels = load_real_digits()
    vae_metrics = train_vae(comp["vae"], images, args, log)
    t_vae = time.perf_counter() - t0

    raw, ys = encode_dataset(comp["vae"], images, labels, copies=8, seed=args.seed)
    mean = raw.mean(dim=(0, 2, 3, 4))
    std = raw.std(dim=(0, 2, 3, 4))
    comp["vae"].register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    log(f"latents {tuple(latents.shape)} mean {mean.tolist()} std {std.tolist()}")

    pipe = WanPipeline(**comp)
    with torch.no_grad():
        embeds, uncond = pipe.encode_prompt(PROMPTS, negative_prompt=[""] * len(PROMPTS),
                                            do_classifier_free_guidance=True,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu"))
    tr_metrics = train_transformer(comp["transformer"], latents, ys, embeds, uncond[:1], args, log)
    t_train = time.perf_counter() - t0
    pipe.save_pretrained(out, safe_serialization=True)
    portable_tokenizer_class(out)
    log(f"saved to {out}")

    ev = evaluate_saved(out, args.eval_samples)
    log(f"eval: accuracy {ev['accuracy']:.3f} per class {ev['per_class']} frechet {ev['frechet']:.3f}")
    n_tr = sum(p.numel() for p in comp["transformer"].parameters())
    n_vae = sum(p.numel() for p in comp["vae"].parameters())
    n_te = sum(p.numel() for p in comp["text_encoder"].parameters())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    record = {
        "settings": settings,
        "sampler": {**_sampler_defaults(), "flow_shift": comp["scheduler"].config.flow_shift},
        "params": {"transformer": n_tr, "vae": n_vae, "text_encoder": n_te},
        "weights_bytes": size,
        "time_s": {"vae": round(t_vae, 1), "total_training": round(t_train, 1)},
        "metrics": {**vae_metrics, **tr_metrics, **ev},
        "torch": torch.__version__,
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(record, out)
    (out / "TRAINING.log").write_text("\n".join(lines) + "\n")
    log(f"weights {size / 1e6:.2f} MB; params transformer {n_tr} vae {n_vae} text_encoder {n_te}")
    return 0
