"""RE-Control's value networks: rollouts of the decoder, then temporal-difference training.

Rollouts (`collect_rollouts`): training prefixes (the last `max_prefix_tokens` tokens of the
prefixes of `dglm data pairs`), continued by sampling; the decoder's final-norm hidden state at
every generated position is recorded by a hidden-state hook (the state h_t from which token t is
drawn: exactly what decode-time editing acts on). A share of the rows decode the prefix alone on
the decoder RE-Control runs on (`plain_decoder`, the released one), the rest through the engine's
DGLM with a random control of a random probe (or none), so the value network sees states of both
kinds and continuations of every label. The reward of a rollout: every probe of the bundle on the
sentence encoder's embedding of the continuation (the probes' logits, (K,) per rollout), so one
set of rollouts trains a value network per probe. Shards of `shard_size` rollouts:
<out>/rollouts_00000.safetensors … (states bf16 (N, T, H) zero past each row's length, lengths (N,),
rewards (N, K) fp32, dglm (N,) bool), written atomically; collection resumes after the last shard.

Training (`train_value`): the loss of the paper over a batch of rollouts,

    mean_t<L−1 (V(h_t) − sg[V(h_(t+1))])²  +  mean (V(h_(L−1)) − r)²

with the terminal state at each rollout's last valid position L − 1 and the bootstrapped target
detached (the reference code took the first valid position and let gradients through the
target). Held out: every 20th rollout; logged: the terminal value error and the correlation of
the value with the reward at the first and the last state (how early V knows where a rollout
ends).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from dglm.engine.api import GenerationParams
from dglm.engine.decoding.loop import generate as decode
from dglm.engine.decoding.sampling import DecodeParams
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.methods.re_control import ValueNetConfig, ValueNetwork
from dglm.engine.models.base import HiddenHook
from dglm.engine.probes import Control
from dglm.engine.training.loop import Progress, Run, TrainConfig
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

SHARD = "rollouts_{:05d}.safetensors"
HELD_OUT_EVERY = 20  # rollout i is held out when i % HELD_OUT_EVERY == 0


@dataclass(frozen=True)
class RolloutConfig:
    rollouts: int = 4096  # in total (collection resumes up to this)
    batch_size: int = 32  # rows per generation batch
    shard_size: int = 256  # rollouts per shard file (a multiple of batch_size)
    max_new_tokens: int = 24
    max_prefix_tokens: int = 16  # keep the last N prefix tokens
    dglm_fraction: float = 0.5  # rows decoded through DGLM with a random control
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rollouts", "batch_size", "shard_size", "max_new_tokens", "max_prefix_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"rollouts: {name} must be a positive integer, got {v!r}")
        if self.shard_size % self.batch_size:
            raise ValueError(
                f"rollouts: shard_size={self.shard_size} must be a multiple of "
                f"batch_size={self.batch_size}"
            )
        if not 0.0 <= self.dglm_fraction <= 1.0:
            raise ValueError(f"rollouts: dglm_fraction must be in [0, 1], got {self.dglm_fraction}")


class StateRecorder(HiddenHook):
    """A hidden-state hook that records each step's final-norm states of the first `rows` rows
    (a loop's companion rows are skipped) and leaves them unchanged."""

    def __init__(self, rows: int) -> None:
        self.rows, self.states = rows, []

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.states.append(hidden[: self.rows, -1].to(torch.bfloat16).clone())  # (R, H)
        return hidden

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.states, dim=1)  # (R, steps, H)


class _Recording(Method):
    """An engine method that runs `inner` and records its rows' hidden states."""

    def __init__(self, inner: Method, recorder_for: Callable[[int], StateRecorder]) -> None:
        self.inner, self.recorder_for, self.recorder = inner, recorder_for, None
        self.name = inner.name

    def validate(self, params: list[GenerationParams]) -> None:
        self.inner.validate(params)

    def decode_params(self, p: GenerationParams, seed: int) -> DecodeParams:
        return self.inner.decode_params(p, seed)

    def condition(self, batch: MethodBatch) -> Conditioning:
        cond = self.inner.condition(batch)
        if cond.hidden_hook is not None:
            raise ValueError("rollouts record the decoder's own states: no hidden hook allowed")
        self.recorder = self.recorder_for(len(batch.rows))
        cond.hidden_hook = self.recorder
        return cond


def training_prefixes(data_dir: str | Path, tokenizer, max_tokens: int, n: int, seed: int):
    """n prefixes from the training pairs (shuffled with `seed`), each cut to its last
    `max_tokens` tokens → list of token-id lists."""
    from dglm.engine.training.data import PAIRS_FILE, read_pairs

    path = Path(data_dir) / PAIRS_FILE.format(split="train")
    pairs = read_pairs(path)
    if not pairs:
        raise ValueError(f"{path} has no training pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        ids = tokenizer.encode(pairs[i].prefix)[-max_tokens:]
        if ids:
            out.append(ids)
        if len(out) == n:
            break
    return out


def probe_rewards(engine, texts: list[str]) -> torch.Tensor:
    """Every probe of the engine on the encoder's embedding of each text → (N, K) fp32 logits, the
    probes in ProbeSet order (engine.probes.offsets)."""
    emb = engine.encoder.embed(texts).float()
    return torch.cat([p.logits(emb) for p in engine.probes.probes.values()], dim=1).cpu()


def collect_rollouts(
    engine,
    plain_decoder,
    data_dir: str | Path,
    out: str | Path,
    cfg: RolloutConfig,
    progress: Progress | None = None,
) -> Path:
    """Write rollout shards to `out` until it holds cfg.rollouts (resuming after the shards that
    are there) → out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-cfg.rollouts // cfg.shard_size)
    prefixes = training_prefixes(
        data_dir, engine.tokenizer, cfg.max_prefix_tokens, cfg.rollouts, cfg.seed
    )
    if len(prefixes) < cfg.rollouts:
        logger.warning(
            "rollouts: %d training prefixes for %d rollouts: prefixes repeat (with new seeds)",
            len(prefixes),
            cfg.rollouts,
        )
    labels = [(name, lab) for name, p in engine.probes.probes.items() for lab in p.labels]
    done = 0
    for s in range(n_shards):
        path = out / SHARD.format(s)
        size = min(cfg.shard_size, cfg.rollouts - s * cfg.shard_size)  # the last may be short
        if path.exists():
            done += size
            if progress:
                progress(done, {})
            continue
        parts: dict[str, list[torch.Tensor]] = {"states": [], "lengths": [], "rewards": []}
        parts["dglm"] = []
        for b in range(0, size, cfg.batch_size):
            rng = random.Random(cfg.seed * 1_000_003 + s * 10_007 + b)
            first = s * cfg.shard_size + b
            ids = [
                prefixes[i % len(prefixes)]
                for i in range(first, first + min(cfg.batch_size, size - b))
            ]
            n_dglm = round(cfg.dglm_fraction * len(ids))
            states, lengths, texts = [], [], []
            seeds = [rng.getrandbits(31) for _ in ids]
            if n_dglm:
                st, ln, tx = _dglm_rows(engine, ids[:n_dglm], seeds[:n_dglm], labels, rng, cfg)
                states.append(st)
                lengths += ln
                texts += tx
            if n_dglm < len(ids):
                st, ln, tx = _plain_rows(engine, plain_decoder, ids[n_dglm:], seeds[n_dglm:], cfg)
                states.append(st)
                lengths += ln
                texts += tx
            parts["states"].append(torch.cat(states))
            parts["lengths"].append(torch.tensor(lengths, dtype=torch.long))
            parts["rewards"].append(probe_rewards(engine, texts))
            parts["dglm"].append(torch.arange(len(ids)) < n_dglm)
            done += len(ids)
            if progress:
                progress(done, {})
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        tmp = path.with_suffix(".tmp")
        meta = {"probes": ",".join(engine.probes.probes), "max_new_tokens": str(cfg.max_new_tokens)}
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        logger.info("rollouts: wrote %s", path.name)
    return out


def _padded_states(recorder: StateRecorder, lengths: list[int], T: int) -> torch.Tensor:
    """(R, T, H) bf16 states, zero past each row's length."""
    st = recorder.stacked()[:, :T]
    if st.shape[1] < T:
        st = torch.cat([st, st.new_zeros(st.shape[0], T - st.shape[1], st.shape[2])], dim=1)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return st * valid[..., None]


def _dglm_rows(engine, ids, seeds, labels, rng, cfg):
    """Rows through the engine's DGLM, each with a random control (or none, one time in
    len(labels) + 1)."""
    prompts = [engine.tokenizer.decode(x) for x in ids]
    params = []
    for seed in seeds:
        pick = rng.randrange(len(labels) + 1)
        controls = () if pick == len(labels) else (Control(*labels[pick]),)
        params.append(
            GenerationParams(
                controls=controls,
                seed=seed,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
            )
        )
    method = _Recording(engine.dglm, StateRecorder)
    outs = engine.generate(prompts, params, method=method)
    toks = [o.samples[0].token_ids for o in outs]
    lengths = [max(1, len(t)) for t in toks]
    texts = [o.samples[0].text for o in outs]
    return _padded_states(method.recorder, lengths, cfg.max_new_tokens), lengths, texts


def _plain_rows(engine, decoder, ids, seeds, cfg):
    """Rows decoded from the prefix alone by `decoder`."""
    params = [
        DecodeParams(cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=s)
        for s in seeds
    ]
    recorder = StateRecorder(len(ids))
    results, _ = decode(decoder, engine.tokenizer, ids, params, hidden_hook=recorder)
    lengths = [max(1, len(r.token_ids)) for r in results]
    texts = [r.text for r in results]
    return _padded_states(recorder, lengths, cfg.max_new_tokens), lengths, texts


@dataclass
class Rollouts:
    states: torch.Tensor  # (N, T, H) bf16
    lengths: torch.Tensor  # (N,) long, ≥ 1
    rewards: torch.Tensor  # (N, K_all) fp32
    dglm: torch.Tensor  # (N,) bool
    probes: list[str]  # the reward columns' probes, in order


def load_rollouts(directory: str | Path) -> Rollouts:
    from safetensors import safe_open

    directory = Path(directory)
    paths = sorted(directory.glob("rollouts_*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no rollouts_*.safetensors in {directory}: run `dglm train value`")
    parts = [load_file(str(p)) for p in paths]
    with safe_open(str(paths[0]), "pt") as f:
        probes = (f.metadata() or {}).get("probes", "").split(",")
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return Rollouts(cat["states"], cat["lengths"], cat["rewards"], cat["dglm"], probes)


def reward_columns(engine_probes, probe: str) -> slice:
    """The reward columns of `probe` (ProbeSet order)."""
    if probe not in engine_probes.probes:
        raise ValueError(
            f"--probe {probe!r} is not a probe of the bundle (probes: {list(engine_probes.probes)})"
        )
    off = engine_probes.offsets[probe]
    return slice(off, off + engine_probes.probes[probe].rows)


def td_loss(
    net: ValueNetwork,
    states: torch.Tensor,
    lengths: torch.Tensor,
    reward: torch.Tensor,
    mc_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TD loss over the non-terminal states, terminal loss) for a batch: states (B, T, H),
    lengths (B,), reward (B, K). mc_weight > 0 adds the Monte-Carlo regression of every valid
    state's value on the reward (mean over states, times mc_weight) to the TD term."""
    v = net(states.float())  # (B, T, K)
    B, T, _ = v.shape
    t = torch.arange(T, device=v.device)[None, :]
    inner = (t < (lengths[:, None] - 1)).float()  # t has a successor within the rollout
    target = torch.cat([v[:, 1:], v[:, -1:]], dim=1).detach()
    td = ((v - target) ** 2).mean(-1) * inner
    td = td.sum() / inner.sum().clamp_min(1.0)
    last = v[torch.arange(B), lengths - 1]  # the last valid position
    term = ((last - reward) ** 2).mean()
    if mc_weight > 0:
        valid = (t < lengths[:, None]).float()
        mc = ((v - reward[:, None, :]) ** 2).mean(-1) * valid
        td = td + mc_weight * mc.sum() / valid.sum()
    return td, term


@torch.no_grad()
def value_metrics(net: ValueNetwork, data: Rollouts, cols: slice, rows: torch.Tensor) -> dict:
    """Held-out terminal MSE and the value–reward correlation at the first / last state."""
    net.eval()
    st, ln, r = data.states[rows], data.lengths[rows], data.rewards[rows][:, cols]
    v = torch.cat([net(st[i : i + 256].float()) for i in range(0, len(rows), 256)])
    last = v[torch.arange(len(rows)), ln - 1]
    first = v[:, 0]
    net.train()

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))

    return {
        "eval_terminal_mse": float(((last - r) ** 2).mean()),
        "eval_reward_var": float(r.var()),
        "eval_corr_first": corr(first, r),
        "eval_corr_last": corr(last, r),
    }


def train_value(
    data: Rollouts,
    cols: slice,
    net_config: ValueNetConfig,
    cfg: TrainConfig,
    out: str | Path,
    progress: Progress | None = None,
    device: str = "cpu",
    mc_weight: float = 0.0,
    state_noise: float = 0.0,
) -> ValueNetwork:
    """TD-train a value network on the rollouts' reward columns `cols` → the EMA network
    (mc_weight: see td_loss). state_noise: the standard deviation, relative to the states' own
    per-coordinate RMS, of Gaussian noise added to the training states: a smoother value, whose
    gradient (what decoding follows) generalises off the rollouts' states."""
    n = data.states.shape[0]
    held = torch.arange(n) % HELD_OUT_EVERY == 0
    train_rows, eval_rows = torch.nonzero(~held)[:, 0], torch.nonzero(held)[:, 0]
    if len(train_rows) == 0 or len(eval_rows) == 0:
        raise ValueError(f"{n} rollouts are too few to hold out every {HELD_OUT_EVERY}th")
    if data.states.shape[2] != net_config.input_dim:
        raise ValueError(
            f"rollout states are {data.states.shape[2]}-d but the value network reads "
            f"{net_config.input_dim}-d states"
        )
    net = ValueNetwork(net_config)
    run = Run(out, net, cfg, "value", net_config.to_dict(), device)
    dev = run.device
    rms = float(data.states[train_rows[:256]].float().pow(2).mean().sqrt())
    for idx in run.batches(len(train_rows)):
        rows = train_rows[idx]
        states = data.states[rows].to(dev).float()
        if state_noise > 0:
            noise = torch.randn(states.shape, generator=run.gen).to(dev)
            states = states + state_noise * rms * noise
        td, term = td_loss(
            net,
            states,
            data.lengths[rows].to(dev),
            data.rewards[rows][:, cols].to(dev),
            mc_weight,
        )
        loss = td + term
        run.optimizer_step(loss)
        parts = {"td": float(td.detach()), "terminal": float(term.detach())}

        def evaluate(parts: dict = parts) -> dict[str, float]:
            return parts | value_metrics(run.ema.model, data, cols, eval_rows)

        run.finish_step(loss, evaluate, progress)
    return run.ema.model


__all__ = [
    "HELD_OUT_EVERY",
    "RolloutConfig",
    "Rollouts",
    "StateRecorder",
    "collect_rollouts",
    "load_rollouts",
    "probe_rewards",
    "reward_columns",
    "td_loss",
    "train_value",
    "training_prefixes",
    "value_metrics",
]
