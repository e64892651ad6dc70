"""Staged training of the tiny document-VQA Qwen2-VL (see docs/tinyvlm.md).

* stage 1 (``lookup``): the language model learns the task on *symbolic* cells: a learned embedding
  ``E_key + E_digit + E_part`` per cell is put at the image-token positions (``inputs_embeds``) with the
  model's own M-RoPE positions. A training-only probe predicts each named key's digit(s) from the
  hidden state of its letter token (without it the lookup stays on a plateau).
* stage 2 (``vision``): the vision tower alone learns to map each rendered 16 x 16 px cell onto the
  frozen stage-1 cell embedding (MSE).
* stage 3 (``decode``): the language model is fine-tuned with the visual KV cropped after prefill:
  cross-entropy on the answer when the target cells survive, a uniform target plus unlikelihood of the
  gold digit when they are dropped (crop sizes drawn alike in both cases). Without it the model solves
  the task during prefill and stores the answer in the question tokens' KV, so dropping visual tokens
  after prefill would not matter. A *twin swap* term removes that shortcut: the page is prefilled again
  with other digits in the target cells, and decoding from the page's own visual KV with the twin's
  post-image text KV must still give the page's answer.

Each stage runs a fixed number of steps from a seed (reproducible), shows a tqdm bar, writes JSON logs
and checkpoints (``--resume`` continues from the last one) and uses a GPU when one is present.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache, Qwen2VLForConditionalGeneration

from vlcache_sglang.research.tasks.docvqa import NO_DIGIT, NO_KEY, N_PARTS, QTYPES, DocGenerator
from vlcache_sglang.research.tinyvlm.assets import ModelSize, Prompter, build_config, build_processor, build_tokenizer
from vlcache_sglang.research.tinyvlm.data import AUX_SLOTS, Batch, make_batch, render_batch
from vlcache_sglang.research.tinyvlm.kvcache import crop_cache, decode_positions, rope_positions

GROUP_NAMES = QTYPES


def optimizer_step(opt: torch.optim.Optimizer, params, loss: torch.Tensor, lr: float) -> None:
    """Set the learning rate, back-propagate ``loss``, clip gradients to norm 1, step."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# ---------------------------------------------------------------------------------------------
class CellEmbed(torch.nn.Module):
    """Symbolic cell embedding ``E_key[k] + E_digit[d] + E_part[p]`` (stage-1 stand-in for the vision tower)."""

    def __init__(self, dim: int, std: float = 0.02):
        super().__init__()
        self.key = torch.nn.Embedding(NO_KEY + 1, dim)
        self.digit = torch.nn.Embedding(NO_DIGIT + 1, dim)
        self.part = torch.nn.Embedding(N_PARTS + 1, dim)
        for e in (self.key, self.digit, self.part):
            torch.nn.init.normal_(e.weight, std=std)

    def forward(self, key: torch.Tensor, digit: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        return self.key(key) + self.digit(digit) + self.part(part)

    def codebook(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (key, digit, part) combinations: embeddings (N, dim) and ids (N, 3)."""
        k, d, p = torch.meshgrid(torch.arange(NO_KEY + 1), torch.arange(NO_DIGIT + 1), torch.arange(N_PARTS + 1),
                                 indexing="ij")
        ids = torch.stack([k.reshape(-1), d.reshape(-1), p.reshape(-1)], 1).to(self.key.weight.device)
        return self(ids[:, 0], ids[:, 1], ids[:, 2]), ids


class Env:
    """Tokenizer, processor, prompter, model and helpers shared by the stages."""

    def __init__(self, size: ModelSize = ModelSize(), device: str | None = None, seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.size = size
        self.tokenizer = build_tokenizer()
        self.processor = build_processor(self.tokenizer)
        self.prompter = Prompter(self.tokenizer)
        self.model = Qwen2VLForConditionalGeneration(build_config(self.tokenizer, size)).to(self.device)
        self.model.config.text_config._attn_implementation = "sdpa"
        self.lm = self.model.model.language_model
        self.cell = CellEmbed(size.hidden).to(self.device)
        self._pos: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions (3, B, prompt+answer) and deltas (B, 1), cached per (qtype, grid)."""
        key = (batch.qtype, batch.grid)
        if key not in self._pos:
            pos, d = rope_positions(self.model, batch.input_ids[:1], batch.image_grid_thw[:1], self.prompter.image_pad)
            self._pos[key] = (pos.to(self.device), d.to(self.device))
        pos, d = self._pos[key]
        b = len(batch.docs)
        return pos.expand(3, b, -1), d.expand(b, -1)

    def symbolic_embeds(self, batch: Batch, with_answer: bool) -> torch.Tensor:
        """Token embeddings with the symbolic cell embeddings at the image positions."""
        ids = (batch.input_ids if with_answer else batch.prompt_ids).to(self.device)
        emb = self.lm.embed_tokens(ids)
        cells = self.cell(batch.cell_key.to(self.device), batch.cell_digit.to(self.device),
                          batch.cell_part.to(self.device))
        vs, ve = batch.vis_start, batch.vis_start + batch.n_visual
        return torch.cat([emb[:, :vs], cells, emb[:, ve:]], 1)

    def answer_weights(self, batch: Batch, digit_w: float = 1.0, other_w: float = 0.2) -> torch.Tensor:
        w = torch.full((batch.answer.shape[1],), other_w, device=self.device)
        w[batch.digit_pos] = digit_w
        return w


def _save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _rng_state(rng: np.random.Generator) -> dict:
    return {"np": rng.bit_generator.state, "torch": torch.get_rng_state()}


def _set_rng_state(rng: np.random.Generator, st: dict) -> None:
    rng.bit_generator.state = st["np"]
    torch.set_rng_state(st["torch"])


class Logger:
    def __init__(self, path: Path, append: bool):
        self.f = open(path, "a" if append else "w")

    def __call__(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        tqdm.write(json.dumps(rec))


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, flat, then linear decay over the last 30 % of the steps."""
    lr = base * min(1.0, (step + 1) / warmup)
    tail = 0.7 * total
    if step > tail:
        lr *= max(0.05, (total - step) / (total - tail))
    return lr


# ---------------------------------------------------------------------------------------------
# stage 1: lookup on symbolic cells
@dataclass
class LookupConfig:
    steps: int = 1500
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    levels: tuple[int, ...] = (6, 8, 12, 16)
    advance_at: float = 0.85
    replay: float = 0.2
    aux: float = 1.0
    eval_every: int = 100
    seed: int = 0
    stop_at: int | None = None        # stop after this many steps (the LR schedule still spans ``steps``)


def lookup_loss(env: Env, batch: Batch, aux_head: torch.nn.Module | None, aux_w: float
                ) -> tuple[torch.Tensor, float]:
    """Teacher-forced answer CE (digits weight 1, other tokens 0.2) + auxiliary letter-token probe."""
    pos, _ = env.positions(batch)
    h = env.lm(inputs_embeds=env.symbolic_embeds(batch, True), position_ids=pos).last_hidden_state
    L, A = batch.prompt_len, batch.answer.shape[1]
    logits = env.model.lm_head(h[:, L - 1:L + A - 1]).float()
    tgt = batch.answer.to(env.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)
    loss = (ce * env.answer_weights(batch)).sum(1).mean()
    if aux_head is not None and aux_w > 0:
        a = aux_head(h[:, batch.letter_pos]).view(len(batch.docs), len(batch.letter_pos), AUX_SLOTS, 10)
        loss = loss + aux_w * F.cross_entropy(a.reshape(-1, 10).float(), batch.aux_targets.to(env.device).reshape(-1),
                                              ignore_index=-100)
    pred = logits.argmax(-1)
    acc = (pred[:, batch.digit_pos] == tgt[:, batch.digit_pos]).all(1).float().mean().item()
    return loss, acc


@torch.no_grad()
def eval_symbolic(env: Env, batches: list[Batch]) -> dict[str, float]:
    """Exact match (all answer tokens = teacher-forced argmax) per question type."""
    env.model.eval()
    res: dict[str, list[float]] = {}
    for b in batches:
        pos, _ = env.positions(b)
        h = env.lm(inputs_embeds=env.symbolic_embeds(b, True), position_ids=pos).last_hidden_state
        L, A = b.prompt_len, b.answer.shape[1]
        pred = env.model.lm_head(h[:, L - 1:L + A - 1]).argmax(-1).cpu()
        res.setdefault(b.qtype, []).extend((pred == b.answer).all(1).float().tolist())
    env.model.train()
    return {k: round(float(np.mean(v)), 4) for k, v in res.items()}


def train_lookup(env: Env, out: Path, cfg: LookupConfig, resume: bool = False) -> None:
    """Stage 1. Writes ``out/lookup.pt`` (model, cell embeddings) and ``out/lookup.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    aux_head = torch.nn.Linear(env.size.hidden, AUX_SLOTS * 10).to(env.device)
    params = list(env.lm.parameters()) + list(env.model.lm_head.parameters()) + list(env.cell.parameters()) \
        + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = DocGenerator(cfg.seed + 2, "train")
    step, level, level_acc, level_steps = 0, 0, 0.0, 0
    ck = out / "lookup.pt"
    if resume and ck.exists():
        st = torch.load(ck, weights_only=False, map_location=env.device)
        env.model.load_state_dict(st["model"]); env.cell.load_state_dict(st["cell"])
        aux_head.load_state_dict(st["aux"]); opt.load_state_dict(st["opt"])
        step, level, level_acc, level_steps = st["step"], st["level"], st["level_acc"], st["level_steps"]
        gen.rng.bit_generator.state = st["gen"]
        _set_rng_state(rng, st["rng"])
    log = Logger(out / "lookup.jsonl", append=resume)
    eval_gen = DocGenerator(10_001, "heldout")
    final = cfg.levels[-1]
    ev = [make_batch(eval_gen, env.prompter, q, final, 32) for q in QTYPES for _ in range(2)]

    def save() -> None:
        _save(ck, model=env.model.state_dict(), cell=env.cell.state_dict(), aux=aux_head.state_dict(),
              opt=opt.state_dict(), step=step, level=level, level_acc=level_acc, level_steps=level_steps,
              gen=gen.rng.bit_generator.state, rng=_rng_state(rng), size=asdict(env.size), cfg=asdict(cfg))

    t0 = time.time()
    last = min(cfg.steps, cfg.stop_at or cfg.steps)
    bar = tqdm(total=last, initial=step, desc="stage 1 (lookup)", dynamic_ncols=True)
    env.model.train()
    while step < last:
        cur = int(rng.integers(0, level)) if level > 0 and rng.random() < cfg.replay else level
        qtype = QTYPES[step % len(QTYPES)]
        batch = make_batch(gen, env.prompter, qtype, cfg.levels[cur], cfg.batch)
        loss, acc = lookup_loss(env, batch, aux_head, cfg.aux)
        optimizer_step(opt, params, loss, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        step += 1
        bar.update(1)
        if cur == level:
            level_acc, level_steps = 0.95 * level_acc + 0.05 * acc, level_steps + 1
            if level_acc >= cfg.advance_at and level_steps >= 40 and level < len(cfg.levels) - 1:
                log({"advance": level, "grid": cfg.levels[level], "step": step})
                level, level_acc, level_steps = level + 1, 0.0, 0
        bar.set_postfix(grid=cfg.levels[level], acc=f"{level_acc:.2f}", loss=f"{loss.item():.3f}")
        if step % 25 == 0:
            log({"step": step, "grid": cfg.levels[cur], "qtype": qtype, "loss": round(loss.item(), 4),
                 "level": level, "level_acc": round(level_acc, 3), "t": round(time.time() - t0, 1)})
        if step % cfg.eval_every == 0 or step == last:
            log({"eval_step": step, f"grid{final}_exact": eval_symbolic(env, ev)})
            save()
    bar.close()


# ---------------------------------------------------------------------------------------------
# stage 2: the vision tower
@dataclass
class VisionConfig:
    steps: int = 1500
    cells: int = 2048
    lr: float = 2e-3
    grids: tuple[int, ...] = (8, 12, 16)
    eval_every: int = 250
    seed: int = 0


@torch.no_grad()
def eval_cells(env: Env, gen: DocGenerator, grid: int, n_docs: int = 8) -> dict[str, float]:
    """Nearest-codebook decoding of every merged cell token: key / digit / part accuracy, keyed cells exact."""
    vis = env.model.model.visual
    vis.eval()
    book, ids = env.cell.codebook()
    b = make_batch(gen, env.prompter, "single", grid, n_docs)
    pv, thw = render_batch(gen, b)
    v = vis(pv.to(env.device), grid_thw=thw.to(env.device)).pooler_output
    pred = ids[torch.cdist(v, book).argmin(-1)].cpu()
    true = torch.stack([b.cell_key.reshape(-1), b.cell_digit.reshape(-1), b.cell_part.reshape(-1)], 1)
    keyed = true[:, 0] != NO_KEY
    vis.train()
    return {"key": round((pred[:, 0] == true[:, 0]).float().mean().item(), 4),
            "digit": round((pred[:, 1] == true[:, 1]).float().mean().item(), 4),
            "part": round((pred[:, 2] == true[:, 2]).float().mean().item(), 4),
            "keyed_cell_exact": round((pred == true).all(1)[keyed].float().mean().item(), 4)}


def train_vision(env: Env, out: Path, cfg: VisionConfig, lookup_ckpt: Path, resume: bool = False) -> None:
    """Stage 2. Writes ``out/vision.pt`` (vision tower state) and ``out/vision.jsonl``."""
    st1 = torch.load(lookup_ckpt, weights_only=False, map_location=env.device)
    env.cell.load_state_dict(st1["cell"])
    env.cell.requires_grad_(False)
    vis = env.model.model.visual
    opt = torch.optim.AdamW(vis.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed + 3)
    gen = DocGenerator(cfg.seed + 4, "train")
    book, _ = env.cell.codebook()
    scale = book.pow(2).sum(-1).mean()
    step, ck = 0, out / "vision.pt"
    if resume and ck.exists():
        st = torch.load(ck, weights_only=False, map_location=env.device)
        vis.load_state_dict(st["visual"]); opt.load_state_dict(st["opt"]); step = st["step"]
        gen.rng.bit_generator.state = st["gen"]; _set_rng_state(rng, st["rng"])
    log = Logger(out / "vision.jsonl", append=resume)
    eval_gen = DocGenerator(10_002, "heldout")

    def save() -> None:
        _save(ck, visual=vis.state_dict(), opt=opt.state_dict(), step=step, gen=gen.rng.bit_generator.state,
              rng=_rng_state(rng), cfg=asdict(cfg))

    bar = tqdm(total=cfg.steps, initial=step, desc="stage 2 (vision)", dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.steps:
        grid = int(rng.choice(cfg.grids))
        b = make_batch(gen, env.prompter, QTYPES[step % len(QTYPES)], grid, max(1, cfg.cells // (grid * grid)))
        pv, thw = render_batch(gen, b)
        v = vis(pv.to(env.device), grid_thw=thw.to(env.device)).pooler_output
        with torch.no_grad():
            tgt = env.cell(b.cell_key.reshape(-1).to(env.device), b.cell_digit.reshape(-1).to(env.device),
                           b.cell_part.reshape(-1).to(env.device))
        loss = (v - tgt).pow(2).sum(-1).mean() / scale
        optimizer_step(opt, vis.parameters(), loss, lr_at(step, cfg.steps, cfg.lr, 50))
        step += 1
        bar.update(1)
        bar.set_postfix(rel_mse=f"{loss.item():.4f}")
        if step % 25 == 0:
            log({"step": step, "grid": grid, "rel_mse": round(loss.item(), 5), "t": round(time.time() - t0, 1)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log({"eval_step": step, "heldout_cells_grid16": eval_cells(env, eval_gen, 16)})
            save()
    bar.close()


# ---------------------------------------------------------------------------------------------
# stage 3: decode-time dependence (visual KV cropped after prefill)
@dataclass
class DecodeConfig:
    """Defaults = the settings of the last shipped stage-3 run (3c) as one schedule; the shipped checkpoint
    itself came from a sequence of runs (docs/tinyvlm.md), this single-run default is untested."""

    steps: int = 1200
    lr: float = 3e-4
    warmup: int = 20
    grids: tuple[int, ...] = (8, 16, 24, 32)
    batch_tokens: int = 4096          # documents per batch = clamp(batch_tokens / visual tokens, 4, max_batch)
    max_batch: int = 16
    p_droponly: float = 0.5           # share of target-dropped crops that keep every other visual token
    w_droponly: float = 3.0           # weight of the dependence loss in those crops
    w_full: float = 1.0               # CE on the answer decoded from the uncropped cache
    w_swap: float = 2.0               # CE on the answer decoded with the post-image text KV of a twin page
    swap_cropped: bool = True         # crop the swapped cache like case A (False: full visual cache)
    eval_every: int = 100
    seed: int = 0


def _decode_logits(env: Env, batch: Batch, cache: DynamicCache, deltas: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits for answer tokens 1..A-1 decoded on ``cache`` (token 0 comes from prefill)."""
    ans = batch.answer.to(env.device)
    x = env.lm.embed_tokens(ans[:, :-1])
    pos = decode_positions(batch.prompt_len, deltas, 0, ans.shape[1] - 1)
    h = env.lm(inputs_embeds=x, position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state
    return env.model.lm_head(h).float()


def _keep_sets(batch: Batch, rng: np.random.Generator, droponly: bool) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Visual indices kept in case A (all targets kept) and case B (some targets dropped), and the mask
    (B, T) of dropped targets. A and B keep the same number of visual tokens (except drop-only B)."""
    n, b = batch.n_visual, len(batch.docs)
    t = batch.targets.numpy()
    nt = t.shape[1]
    if batch.qtype in ("single", "max"):
        dropped = np.ones((b, nt), bool)
    else:
        all_drop = rng.random(b) < 0.5
        dropped = rng.random((b, nt)) < 0.5
        dropped[all_drop] = True
        dropped[~dropped.any(1), 0] = True
    k = int(rng.integers(nt, n - nt + 1))
    keep_a = np.zeros((b, k), np.int64)
    keep_b = []
    for i in range(b):
        others = np.setdiff1d(np.arange(n), t[i])
        keep_a[i, :nt] = t[i]
        keep_a[i, nt:] = rng.choice(others, k - nt, replace=False)
        kept_targets = t[i][~dropped[i]]
        if droponly:
            kb = others
        else:
            kb = rng.choice(others, k - len(kept_targets), replace=False)
        keep_b.append(np.concatenate([kept_targets, kb]))
    m = min(len(x) for x in keep_b)         # rows that dropped fewer targets lose a few random others
    for i in range(b):
        extra = len(keep_b[i]) - m
        if extra:
            nk = int((~dropped[i]).sum())
            drop = nk + rng.choice(len(keep_b[i]) - nk, extra, replace=False)
            keep_b[i] = np.delete(keep_b[i], drop)
    return torch.from_numpy(keep_a), torch.from_numpy(np.stack(keep_b)), dropped


def decode_loss(env: Env, batch: Batch, rng: np.random.Generator, cfg: DecodeConfig, train: bool = True
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """One prefill, three decodes (full, targets kept, targets dropped) and the combined loss."""
    b = len(batch.docs)
    pos, deltas = env.positions(batch)
    L = batch.prompt_len
    cache = DynamicCache(config=env.model.config.text_config)
    h = env.lm(inputs_embeds=env.symbolic_embeds(batch, False), position_ids=pos[:, :, :L], past_key_values=cache,
               use_cache=True).last_hidden_state
    ans = batch.answer.to(env.device)
    loss = 0.2 * F.cross_entropy(env.model.lm_head(h[:, -1]).float(), ans[:, 0])
    w = env.answer_weights(batch)[1:]
    tgt = ans[:, 1:]
    droponly = train and rng.random() < cfg.p_droponly
    keep_a, keep_b, dropped = _keep_sets(batch, rng, droponly)
    vs, n = batch.vis_start, batch.n_visual
    cfg_t = env.model.config.text_config

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)

    lg_a = _decode_logits(env, batch, crop_cache(cache, keep_a, vs, n, cfg_t), deltas)
    loss = loss + (ce(lg_a) * w).sum(1).mean()
    lg_b = _decode_logits(env, batch, crop_cache(cache, keep_b, vs, n, cfg_t), deltas)
    ce_b = ce(lg_b)
    # which answer digits became unknowable: digit j reads target j (max: the one digit reads all three)
    dpos = [p - 1 for p in batch.digit_pos]                       # indices into tgt
    unknown = torch.zeros(tgt.shape, dtype=torch.bool, device=env.device)
    drop_t = torch.from_numpy(dropped).to(env.device)
    if batch.qtype == "max":
        unknown[:, dpos[0]] = drop_t.any(1)
    else:
        unknown[:, dpos] = drop_t
    known_w = w.expand_as(ce_b) * (~unknown)
    loss = loss + (ce_b * known_w).sum(1).mean()
    lsm = lg_b.log_softmax(-1)
    dig = torch.tensor(env.prompter.digit_ids, device=env.device)
    uni = -lsm[:, :, dig].mean(-1)                                 # CE to uniform over the digits
    p_gold = lsm.gather(2, tgt[..., None]).squeeze(-1).exp()
    unlik = -torch.log1p(-p_gold.clamp(max=1 - 1e-6))
    wd = cfg.w_droponly if droponly else 1.0
    loss = loss + wd * ((uni + unlik) * unknown).sum(1).mean()
    if cfg.w_swap > 0:
        # twin page: same keys and question, the target cells hold other digits. Decoding from this page's
        # visual KV but the twin's question KV must still give this page's answer, so an answer copied into
        # the question tokens' KV during prefill is useless (and misleading) at decode time. (A first run
        # that swapped only with the full visual cache learned to use the copy whenever the cache was cropped.)
        twin_digit = batch.cell_digit.clone()
        rows = torch.arange(b)[:, None].expand_as(batch.targets)
        old_d = twin_digit[rows, batch.targets]
        twin_digit[rows, batch.targets] = (old_d + torch.from_numpy(rng.integers(1, 10, size=old_d.shape))) % 10
        twin = replace(batch, cell_digit=twin_digit)
        cache_t = DynamicCache(config=cfg_t)
        env.lm(inputs_embeds=env.symbolic_embeds(twin, False), position_ids=pos[:, :, :L], past_key_values=cache_t,
               use_cache=True)
        ve = vs + n
        swap = DynamicCache(config=cfg_t)
        for layer in range(len(cache.layers)):
            ka, va = cache.layers[layer].keys, cache.layers[layer].values
            kt, vt = cache_t.layers[layer].keys, cache_t.layers[layer].values
            swap.update(torch.cat([ka[:, :, :ve], kt[:, :, ve:]], 2), torch.cat([va[:, :, :ve], vt[:, :, ve:]], 2), layer)
        # cropped like case A (targets kept): the copy must be useless in sparse caches too, not only in full ones
        if cfg.swap_cropped:
            swap = crop_cache(swap, keep_a, vs, n, cfg_t)
        lg_s = _decode_logits(env, batch, swap, deltas)
        loss = loss + cfg.w_swap * (ce(lg_s) * w).sum(1).mean()
    if cfg.w_full > 0:
        lg_f = _decode_logits(env, batch, crop_cache(cache, torch.arange(n).expand(b, -1), vs, n, cfg_t), deltas)
        loss = loss + cfg.w_full * (ce(lg_f) * w).sum(1).mean()
    acc_a = (lg_a.argmax(-1)[:, dpos] == tgt[:, dpos]).all(1).float().mean().item()
    ub = unknown[:, dpos]
    acc_b = ((lg_b.argmax(-1)[:, dpos] == tgt[:, dpos]) | ~ub).all(1).float().mean().item()
    return loss, {"acc_kept": acc_a, "acc_dropped": acc_b, "droponly": float(droponly)}


@torch.no_grad()
def eval_decode(env: Env, batches: list[Batch]) -> dict[str, dict[str, float]]:
    """Symbolic exact match per type: full cache, all targets dropped (rest kept), targets only kept."""
    env.model.eval()
    res: dict[str, dict[str, list[float]]] = {}
    cfg_t = env.model.config.text_config
    for b in batches:
        pos, deltas = env.positions(b)
        L, n, vs = b.prompt_len, b.n_visual, b.vis_start
        cache = DynamicCache(config=cfg_t)
        h = env.lm(inputs_embeds=env.symbolic_embeds(b, False), position_ids=pos[:, :, :L], past_key_values=cache,
                   use_cache=True).last_hidden_state
        first = env.model.lm_head(h[:, -1]).argmax(-1).cpu()
        t = b.targets
        others = torch.stack([torch.from_numpy(np.setdiff1d(np.arange(n), t[i].numpy())) for i in range(len(t))])
        conds = {"full": torch.arange(n).expand(len(t), -1), "drop_targets": others, "targets_only": t}
        r = res.setdefault(b.qtype, {})
        for name, keep in conds.items():
            lg = _decode_logits(env, b, crop_cache(cache, keep, vs, n, cfg_t), deltas)
            pred = torch.cat([first[:, None], lg.argmax(-1).cpu()], 1)
            r.setdefault(name, []).extend((pred == b.answer).all(1).float().tolist())
    env.model.train()
    return {q: {k: round(float(np.mean(v)), 3) for k, v in r.items()} for q, r in res.items()}


def train_decode(env: Env, out: Path, cfg: DecodeConfig, lookup_ckpt: Path, resume: bool = False,
                 cell_ckpt: Path | None = None) -> None:
    """Stage 3. Writes ``out/decode.pt`` (language model) and ``out/decode.jsonl``.

    ``lookup_ckpt`` is the starting point (a stage-1 checkpoint, or a stage-3 one to continue with other
    settings); the frozen cell embeddings come from it, or from ``cell_ckpt`` when it has none."""
    st1 = torch.load(lookup_ckpt, weights_only=False, map_location=env.device)
    env.model.load_state_dict(st1["model"])
    if "cell" not in st1:
        st1["cell"] = torch.load(cell_ckpt, weights_only=False, map_location=env.device)["cell"]
    env.cell.load_state_dict(st1["cell"])
    env.cell.requires_grad_(False)
    params = list(env.lm.parameters()) + list(env.model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed + 5)
    gen = DocGenerator(cfg.seed + 6, "train")
    step, ck = 0, out / "decode.pt"
    if resume and ck.exists():
        st = torch.load(ck, weights_only=False, map_location=env.device)
        env.model.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); step = st["step"]
        gen.rng.bit_generator.state = st["gen"]; _set_rng_state(rng, st["rng"])
    log = Logger(out / "decode.jsonl", append=resume)
    eval_gen = DocGenerator(10_003, "heldout")
    ev = [make_batch(eval_gen, env.prompter, q, 16, 32) for q in QTYPES]
    if step == 0:
        log({"before": eval_decode(env, ev)})

    def save() -> None:
        _save(ck, model=env.model.state_dict(), cell=env.cell.state_dict(), opt=opt.state_dict(), step=step,
              gen=gen.rng.bit_generator.state, rng=_rng_state(rng), cfg=asdict(cfg))

    bar = tqdm(total=cfg.steps, initial=step, desc="stage 3 (decode)", dynamic_ncols=True)
    t0 = time.time()
    env.model.train()
    while step < cfg.steps:
        grid = int(rng.choice(cfg.grids))
        bs = int(np.clip(cfg.batch_tokens // (grid * grid), 4, cfg.max_batch))
        qtype = QTYPES[step % len(QTYPES)]
        batch = make_batch(gen, env.prompter, qtype, grid, bs)
        loss, m = decode_loss(env, batch, rng, cfg)
        optimizer_step(opt, params, loss, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", kept=f"{m['acc_kept']:.2f}", dropped=f"{m['acc_dropped']:.2f}")
        if step % 10 == 0:
            log({"step": step, "grid": grid, "qtype": qtype, "loss": round(loss.item(), 4), **m,
                 "t": round(time.time() - t0, 1)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log({"eval_step": step, "grid16": eval_decode(env, ev)})
            save()
    bar.close()


# ---------------------------------------------------------------------------------------------
def compose(env: Env, lm_ckpt: Path, vision_ckpt: Path, out_dir: Path) -> Path:
    """Language model from stage 1 or 3 + vision tower from stage 2 -> a saved model directory."""
    from vlcache_sglang.fixtures.qwen2vl_assets import save_model_dir

    st = torch.load(lm_ckpt, weights_only=False, map_location="cpu")
    sv = torch.load(vision_ckpt, weights_only=False, map_location="cpu")
    sd = {k: v for k, v in st["model"].items() if not k.startswith("model.visual.")}
    sd.update({f"model.visual.{k}": v for k, v in sv["visual"].items()})
    env.model.load_state_dict(sd)
    env.model.to("cpu").float()
    return save_model_dir(env.model, env.processor, out_dir)
