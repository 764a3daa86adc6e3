"""``hasten train-embedded --video``: train the embedded text-to-video model (a tiny diffusers WanPipeline).

Initialised from the embedded image model: its transformer (same shapes), its frozen text encoder (vocabulary
extended by the direction words) and its VAE made frame-wise (no temporal compression, so every latent frame
is an image latent the image model knows). The transformer then learns rectified flow on 17-frame clips at
two resolutions (16 and 32 px; 272 and 1088 tokens), with
prompt dropout and EMA as for the image model. Seeded, and resumable: a checkpoint is written every
``--ckpt-every`` steps to ``--ckpt-dir`` (outside the repo) and ``--resume`` continues from it.
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

from .video_data import (
    DIRECTIONS,
    HALF_SIZE,
    downsample,
    load_digit_sprites,
    render_clips,
    to_vae,
    video_prompt,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights_video"
IMAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CKPT_DIR = Path.home() / ".cache" / "hasten" / "video_train"
NEW_WORDS = ("moving", *DIRECTIONS)
MAX_SEQUENCE_LENGTH = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", action="store_true", help="train the video model (this module; accepted so "
                        "`hasten train-embedded --video` parses)")
    parser.add_argument("--out", type=Path, default=Path("embedded-video-weights"),
                        help="output folder (diffusers layout); copy it to hasten/embedded/weights_video to ship it")
    parser.add_argument("--ckpt-dir", type=Path, default=DEFAULT_CKPT_DIR, help="checkpoints (outside the repo)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=3000, help="pre-encoded training clips (both sizes)")
    parser.add_argument("--steps", type=int, default=3000, help="transformer training steps")
    parser.add_argument("--batch", type=int, default=8, help="clips per step at the half size")
    parser.add_argument("--full-batch", type=int, default=4, help="clips per step at the full size")
    parser.add_argument("--full-every", type=int, default=2, help="a full-size step every N steps (others half)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dropout", type=float, default=0.12, help="probability of training on the empty prompt")
    parser.add_argument("--sigma-shift", type=float, default=3.0,
                        help="flow shift of the training noise levels and of the shipped scheduler: the motion is "
                             "decided at high noise, which a 17-frame clip survives far longer than one image")
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop (checkpoint + export) after this much wall time in this run; 0 = no limit")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device for training (e.g. cuda; the record is CPU)")
    parser.add_argument("--eval-clips", type=int, default=20,
                        help="clips in the final check (40 = every digit x direction once)")
    parser.add_argument("--eval-only", action="store_true", help="re-score the weights in --out; no training")


# ----------------------------------------------------------------------------------------------- build
def build_tokenizer():
    """The image model's word-level tokenizer plus "moving" and the four directions."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "digit": 3, **{str(n): 4 + n for n in range(10)}}
    vocab.update({w: 16 + i for i, w in enumerate(NEW_WORDS)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=MAX_SEQUENCE_LENGTH)


def build_components(seed: int, image_dir: Path = IMAGE_WEIGHTS_DIR, shift: float = 3.0) -> dict[str, Any]:
    """All pipeline parts, initialised from the image model where shapes allow."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    te = UMT5EncoderModel.from_pretrained(image_dir / "text_encoder", local_files_only=True)
    old = te.get_input_embeddings().weight.detach()
    n_new = 16 + len(NEW_WORDS)
    gen = torch.Generator().manual_seed(seed + 11)
    new = torch.randn(n_new, old.shape[1], generator=gen) * old[3:13].std()
    new[: old.shape[0]] = old
    te.resize_token_embeddings(n_new, mean_resizing=False)
    te.get_input_embeddings().weight.data.copy_(new)
    te.config.vocab_size = n_new
    te = te.eval().requires_grad_(False)

    img_vae = AutoencoderKLWan.from_pretrained(image_dir / "vae", local_files_only=True)
    vae = AutoencoderKLWan(**{**{k: v for k, v in img_vae.config.items() if not k.startswith("_")},
                              "scale_factor_temporal": 1})
    _init_video_vae(vae, img_vae)

    img_tr = WanTransformer3DModel.from_pretrained(image_dir / "transformer", local_files_only=True)
    transformer = WanTransformer3DModel(**{k: v for k, v in img_tr.config.items() if not k.startswith("_")})
    transformer.load_state_dict(img_tr.state_dict())
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000)
    return {"tokenizer": build_tokenizer(), "text_encoder": te, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


@torch.no_grad()
def _init_video_vae(vae, img_vae) -> None:
    """Copy the image VAE and make it act frame by frame: the causal temporal taps, which only ever saw
    zero padding in image training, are zeroed, so a clip's latents are exactly its frames' image latents
    (no temporal compression: 17 frames -> 17 latent frames) and the image model's prior carries over."""
    src = img_vae.state_dict()
    dst = vae.state_dict()
    if set(src) != set(dst):
        raise RuntimeError("video VAE and image VAE differ in structure")
    for k, v in dst.items():
        w = src[k].clone()
        if w.ndim == 5 and w.shape[2] == 3:
            w[:, :, :2] = 0
        v.copy_(w)
    vae.load_state_dict(dst)


@torch.no_grad()
def _vae_clip_mse(vae, sprites, seed: int, device: str = "cpu") -> float:
    """Reconstruction MSE (in [-1, 1]) of the frame-wise VAE on 16 full-size clips through the real clip path."""
    gen = torch.Generator().manual_seed(seed + 5)
    idx = torch.randint(0, len(sprites), (16,), generator=gen)
    x = to_vae(render_clips(sprites[idx], torch.randint(0, 4, (16,), generator=gen), gen)).to(device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float(F.mse_loss(rec.clamp(-1, 1), x))


@torch.no_grad()
def encode_frames(vae, clips: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """(B, T, H, W) clips in [0, 1] -> (B, C, T, h, w) latents (posterior means), every frame on its own
    (equal to a clip encode, since the VAE is frame-wise; far cheaper than its chunked causal loop)."""
    b, t, h, w = clips.shape
    x = to_vae(clips.reshape(b * t, 1, h, w)).to(device)  # (b*t, 3, 1, h, w)
    z = vae.encode(x).latent_dist.mean.cpu()  # (b*t, C, 1, h', w')
    return z.view(b, t, *z.shape[1:]).squeeze(3).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def encode_clips(vae, sprites, labels, n: int, seed: int, log, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``n`` random clips encoded at the full and the half size, with their digit and direction."""
    gen = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(0, len(sprites), (n,), generator=gen)
    dirs = torch.randint(0, 4, (n,), generator=gen)
    full, half = [], []
    for i in range(0, n, 32):
        clips = render_clips(sprites[idx[i : i + 32]], dirs[i : i + 32], gen)
        full.append(encode_frames(vae, clips, device))
        half.append(encode_frames(vae, downsample(clips, HALF_SIZE), device))
        if i % 640 == 0:
            log(f"encoded {i + len(clips)}/{n} clips")
    return {"full": torch.cat(full), "half": torch.cat(half), "digits": labels[idx], "dirs": dirs}


def _pick(data: dict[str, torch.Tensor], size: str, bs: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, len(data[size]), (bs,), generator=gen)


# ----------------------------------------------------------------------------------------- transformer
def _prompt_table(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of all 40 prompts (row 10*dir + digit ... see _row) plus the empty prompt as row 40."""
    prompts = [video_prompt(d, r) for r in DIRECTIONS for d in range(10)]
    with torch.no_grad():
        emb, unc = pipe.encode_prompt(prompts, negative_prompt=[""] * len(prompts), do_classifier_free_guidance=True,
                                      max_sequence_length=MAX_SEQUENCE_LENGTH, device=torch.device("cpu"))
    return emb, unc[:1]


def _lr_factor(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm)))) * 0.95 + 0.05


def _save_ckpt(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    from diffusers import WanPipeline

    from .train import _fold_padding, portable_tokenizer_class

    torch.set_num_threads(args.threads)
    if args.eval_only:
        return rescore(args.out, args.eval_clips, args.device)
    t_start = time.perf_counter()
    ckdir: Path = args.ckpt_dir
    ckdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    prev_log = ckdir / "train.log"
    if args.resume and prev_log.exists():
        lines = prev_log.read_text().splitlines()

    def log(msg: str) -> None:
        msg = f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - t_start:7.1f}s] {msg}"
        print(msg, flush=True)
        lines.append(msg)
        with prev_log.open("a") as f:
            f.write(msg + "\n")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    for k in ("out", "ckpt_dir", "resume", "eval_only", "max_minutes", "video"):
        settings.pop(k, None)
    if not args.resume:
        prev_log.write_text("")
        lines = []
    log(f"settings {json.dumps(settings)} resume={args.resume}")
    comp = build_components(args.seed, shift=args.sigma_shift)
    dev = torch.device(args.device)
    comp["vae"].to(dev)
    comp["transformer"].to(dev)
    sprites, labels = load_digit_sprites()
    data_ckpt, tr_ckpt = ckdir / "latents.pt", ckdir / "transformer.pt"
    times = {"encode": 0.0, "transformer": 0.0}
    vae_metrics = {"vae_mse": _vae_clip_mse(comp["vae"], sprites, args.seed, dev)}
    log(f"frame-wise VAE reconstruction MSE on clips: {vae_metrics['vae_mse']:.5f}")
    if args.resume and data_ckpt.exists():
        data = torch.load(data_ckpt)
        times["encode"] = data.get("time", 0.0)
    else:
        t0 = time.perf_counter()
        raw = encode_clips(comp["vae"], sprites, labels, args.clips, args.seed, log, dev)
        mean = torch.tensor(comp["vae"].config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(comp["vae"].config.latents_std).view(1, -1, 1, 1, 1)
        times["encode"] = round(time.perf_counter() - t0, 1)
        data = {"full": (raw["full"] - mean) / std, "half": (raw["half"] - mean) / std, "digits": raw["digits"],
                "dirs": raw["dirs"], "time": times["encode"]}
        _save_ckpt(data_ckpt, data)
        log(f"latents full {tuple(data['full'].shape)} half {tuple(data['half'].shape)} in {times['encode']} s")

    comp["vae"].cpu()
    comp["transformer"].cpu()
    pipe = WanPipeline(**comp)
    emb, unc = _prompt_table(pipe)
    comp["transformer"].to(dev)
    table = torch.cat([emb, unc])  # row 10 * direction + digit; row 40 = ""
    transformer = comp["transformer"]
    short, old_procs = _fold_padding(transformer, table)
    short = short.to(dev)
    for block in transformer.blocks:
        block.attn2.processor.bias = block.attn2.processor.bias.to(dev)
    ema = [p.detach().clone() for p in transformer.parameters()]
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 3)
    step, avg = 0, {"half": None, "full": None}
    if args.resume and tr_ckpt.exists():
        st = torch.load(tr_ckpt, map_location=dev)
        transformer.load_state_dict(st["model"])
        for e, v in zip(ema, st["ema"]):
            e.copy_(v)
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"].cpu())
        step, avg = st["step"], st["avg"]
        times["transformer"] = st["time"]
        log(f"resumed transformer at step {step}")
    transformer.train()
    run_start = time.perf_counter()
    t_seg = time.perf_counter()

    def checkpoint() -> None:
        nonlocal t_seg
        times["transformer"] = round(times["transformer"] + time.perf_counter() - t_seg, 1)
        t_seg = time.perf_counter()
        _save_ckpt(tr_ckpt, {"model": transformer.state_dict(), "ema": ema, "opt": opt.state_dict(),
                             "gen": gen.get_state(), "step": step, "avg": avg, "time": times["transformer"]})

    stopped_early = False
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = args.lr * _lr_factor(step, args.steps)
        size = "full" if args.full_every > 0 and step % args.full_every == args.full_every - 1 else "half"
        bs = args.full_batch if size == "full" else args.batch
        idx = _pick(data, size, bs, gen)
        z = data[size][idx].to(dev)
        row = data["dirs"][idx] * 10 + data["digits"][idx]
        row[torch.rand(bs, generator=gen) < args.dropout] = 40
        u = torch.randn(bs, generator=gen)
        sigma = torch.where(torch.rand(bs, generator=gen) < 0.1, torch.rand(bs, generator=gen),
                            torch.sigmoid(u))
        sigma = (args.sigma_shift * sigma / (1 + (args.sigma_shift - 1) * sigma)).clamp(1e-3, 1.0)
        noise = torch.randn(z.shape, generator=gen).to(dev)
        sigma = sigma.to(dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = transformer((1 - s) * z + s * noise, sigma * 1000, short[row.to(dev)], return_dict=False)[0]
        loss = F.mse_loss(pred, noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, transformer.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        a = avg[size]
        avg[size] = loss.item() if a is None else 0.95 * a + 0.05 * loss.item()
        step += 1
        if step % 20 == 0 or step == args.steps:
            log(f"step {step:5d}  loss half {avg['half'] or 0:.4f} full {avg['full'] or 0:.4f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}")
        if step % args.ckpt_every == 0:
            checkpoint()
        if args.max_minutes > 0 and time.perf_counter() - run_start > args.max_minutes * 60 and step < args.steps:
            log(f"time budget of {args.max_minutes} min reached at step {step}: checkpoint + export")
            stopped_early = True
            break
    checkpoint()
    with torch.no_grad():
        for e, p in zip(ema, transformer.parameters()):
            p.copy_(e)
    for block, proc in zip(transformer.blocks, old_procs):
        block.attn2.set_processor(proc)
    transformer.eval().cpu()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    portable_tokenizer_class(out)
    log(f"saved to {out} (EMA weights, step {step}/{args.steps})")
    size_b = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    record = {
        "settings": settings,
        "command": "hasten train-embedded --video " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k not in ("command", "video")),
        "steps_done": step,
        "stopped_early": stopped_early,
        "params": {name: sum(p.numel() for p in comp[name].parameters())
                   for name in ("transformer", "vae", "text_encoder")},
        "weights_bytes": size_b,
        "time_s": {**times, "total_training": round(times["encode"] + times["transformer"], 1)},
        "metrics": {**vae_metrics, "flow_loss_half": avg["half"], "flow_loss_full": avg["full"]},
        "torch": torch.__version__,
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "TRAINING.log").write_text("\n".join(lines) + "\n")
    rescore(out, args.eval_clips, args.device)
    return 0


# ---------------------------------------------------------------------------------------------- record
def write_report(record: dict[str, Any], out: Path) -> None:
    """TRAINING.md: the human-readable twin of TRAINING.json."""
    m, p, t = record["metrics"], record["params"], record["time_s"]
    ev = record.get("eval", {})
    lines = [
        "# Embedded video model: training record",
        "",
        f"Reproduce: `{record['command']}` (CPU, seed {record['settings']['seed']}; "
        f"add `--resume` to continue from the checkpoint in `--ckpt-dir`).",
        "",
        f"- Settings: {json.dumps(record['settings'])}",
        f"- Steps done: {record['steps_done']} of {record['settings']['steps']}"
        + (" (stopped by the time budget; resumable)" if record.get("stopped_early") else ""),
        f"- Parameters: transformer {p['transformer']:,}, VAE {p['vae']:,}, text encoder {p['text_encoder']:,} "
        "(frozen; the image model's, vocabulary extended)",
        f"- Weights on disk: {record['weights_bytes'] / 1e6:.2f} MB (safetensors)",
        f"- Training time: clip encoding {t['encode']} s, transformer {t['transformer']} s, "
        f"total {t['total_training']} s ({record['torch']})",
        f"- VAE (the image model's, frame-wise) reconstruction MSE on full-size clips (in [-1, 1]) "
        f"{m['vae_mse']:.5f}; final flow-matching loss "
        f"half {m['flow_loss_half'] or 0:.4f}, full {m['flow_loss_full'] or 0:.4f}",
    ]
    if ev:
        lines += [
            f"- Sampler defaults: {ev['steps']} steps, guidance {ev['guidance']}, {ev['size']}x{ev['size']}, "
            f"{ev['frames']} frames",
            f"- On {ev['samples']} clips (every digit x direction): per-frame digit accuracy {ev['digit_accuracy']:.1%}, "
            f"clip digit accuracy (majority of frames) {ev['clip_digit_accuracy']:.1%}, "
            f"motion accuracy {ev['motion_accuracy']:.1%}",
            f"- Per direction motion accuracy: {json.dumps(ev['motion_per_direction'])}",
            f"- Fréchet distance to real digits (classifier features, centred frame crops): {ev['frechet']:.3f}",
            f"- Evaluation time {record.get('eval_time_s', 0)} s",
        ]
    (out / "TRAINING.md").write_text("\n".join(lines) + "\n")


def rescore(out: Path, clips: int, device: str = "cpu") -> int:
    """Score the saved weights at the loader's defaults and update TRAINING.json / TRAINING.md."""
    from .video import evaluate_video, load_video_embedded

    record = json.loads((out / "TRAINING.json").read_text())
    t0 = time.perf_counter()
    ev = evaluate_video(load_video_embedded(device=device, path=out), clips=clips, seed=1234)
    record["eval"] = ev
    record["eval_time_s"] = round(time.perf_counter() - t0, 1)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(record, out)
    print(f"digit accuracy {ev['digit_accuracy']:.3f} motion accuracy {ev['motion_accuracy']:.3f} "
          f"frechet {ev['frechet']:.3f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hasten train-embedded --video", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
