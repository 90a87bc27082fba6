"""RE-Control (Kong et al., 2024, "Aligning Large Language Models with Representation Editing: A
Control Perspective") as a `Method`: value-guided editing of the decoder's hidden states.

Decoding is a dynamical system whose state is the decoder's final-norm hidden state h_t (after the
last norm, before the LM head). A small value network V reads h_t and predicts the reward of the
finished continuation; here the reward is a probe of the bundle applied to the sentence encoder's
embedding of the continuation, so V has one output per probe row (it predicts the probe's logits)
and one probe serves DGLM and RE-Control alike. At every decoding step, before the logits are
taken, each controlled row's state takes n gradient-ascent steps of size α on

    J(h) = Σ_(row k, target y) log σ(±V_k(h))      (+ for y = 1, − for y = 0)

i.e. toward the value of its control's target; the KV cache is untouched (the edit acts on the
LM head's input only). The gradient of the MLP is computed analytically (forward with the ReLU
masks kept, backward by matmuls: no autograd in the decode loop) by `value_ascent`; rows without
a RE-Control control pass through bit-identical.

Plausibility (optional, per request): the edit moves h toward the value network's target wherever
that leads, including onto tokens the unedited decoder finds implausible, which is where its
fluency cost comes from. With plausibility β > 0 a row's edited scores are kept only on tokens
whose probability under the *unedited* state is at least β times that state's most likely token's
(the plausibility mask of contrastive decoding, Li et al. 2023, here around the edit instead of
around the soft prompt; `PlausibleEdit`): the edit chooses among what the decoder would plausibly
say. It costs one more LM-head product per masked row.

`ValueEdit` is the `HiddenHook` the decode loop runs; `ReControl` is the method on its own (plain
decoding of the prefix by a frozen decoder, edited), and DGLM adds the same hook for controls with
`method="re-control"` or `"both"` (see methods.dglm). `StaticValueEdit` is the hook's static form
(fixed-row buffers refilled per batch, no host sync, no batch-dependent shape), which the decode
runner records in its CUDA graphs (decoding.runner).

Reference-code defects fixed here (see the design notes): one MLP depth for training and
inference (the network's config travels with its weights); the terminal state of a rollout is its
last valid position (training.value), and the temporal-difference target is detached.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from dglm.engine.api import MAX_RE_CONTROL_STEP as MAX_STEP_SIZE
from dglm.engine.api import MAX_RE_CONTROL_STEPS as MAX_STEPS
from dglm.engine.api import GenerationParams
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.models.base import HiddenHook, StaticHook
from dglm.kernels import value_edit
from torch import nn

if TYPE_CHECKING:
    from dglm.engine.probes import Control, Probe, ProbeSet

# decode-time defaults (a bundle's value network may carry its own)
DEFAULT_STEPS = 30  # n: gradient steps per decoding step (the reference's released configs)
DEFAULT_STEP_SIZE = 0.5  # α
# rows up to which the C++ edit beats this PyTorch form on CPU (SmolLM2, the shipped 2 × 256 value
# network, 30 steps, one core: 1 row 0.7 vs 4.2 ms, 2 rows 1.4 vs 6.2, 16 rows 10.0 vs 8.8)
NATIVE_MAX_ROWS = 8

VALUE_NET_PRESETS = {
    # (hidden width, hidden layers); None width = the decoder's
    "small": (256, 2),
    "reference": (None, 2),  # the reference: hidden = model width, 3 linear layers, ReLU
}


@dataclass(frozen=True)
class ValueNetConfig:
    probe: str  # the probe whose logits it predicts (its reward)
    input_dim: int  # the decoder's hidden size
    outputs: int  # the probe's rows
    hidden_dim: int = 256
    depth: int = 2  # hidden layers (linear + ReLU each), then the output layer
    steps: int = DEFAULT_STEPS  # its decode-time defaults
    step_size: float = DEFAULT_STEP_SIZE
    # the step size when the control also acts through DGLM (method "both"; None: step_size):
    # the soft prompt already carries the plan, and a full-size edit on top of it costs fluency
    step_size_with_dglm: float | None = None
    # β of the plausibility mask around the edit (0 = off; see the module docstring), alone and
    # with DGLM (None: plausibility)
    plausibility: float = 0.0
    plausibility_with_dglm: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.probe, str) or not self.probe:
            raise ValueError(f"value network probe must be a probe's name, got {self.probe!r}")
        for name in ("input_dim", "outputs", "hidden_dim", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"value network {name} must be a positive integer, got {v!r}")
        check_edit(self.steps, self.step_size, f"value network {self.probe!r}")
        if self.step_size_with_dglm is not None:
            where = f"value network {self.probe!r}"
            check_edit(self.steps, self.step_size_with_dglm, where, "step_size_with_dglm")
        check_plausibility(self.plausibility, f"value network {self.probe!r} plausibility")
        if self.plausibility_with_dglm is not None:
            check_plausibility(
                self.plausibility_with_dglm, f"value network {self.probe!r} plausibility_with_dglm"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ValueNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"value network config has unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, probe: str, input_dim: int, outputs: int) -> ValueNetConfig:
        if name not in VALUE_NET_PRESETS:
            raise ValueError(f"value network preset must be one of {sorted(VALUE_NET_PRESETS)}")
        width, depth = VALUE_NET_PRESETS[name]
        return cls(probe, input_dim, outputs, width or input_dim, depth)


def check_edit(
    steps: object, step_size: object, where: str = "re_control", size_name: str = "step_size"
) -> None:
    """ValueError naming the field unless 0 ≤ steps ≤ MAX_STEPS (integer) and step_size (named
    `size_name`) is a finite number in [0, MAX_STEP_SIZE]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"{where} steps must be an integer in [0, {MAX_STEPS}], got {steps!r}")
    bad = isinstance(step_size, bool) or not isinstance(step_size, int | float)
    if bad or not math.isfinite(step_size) or not 0 <= step_size <= MAX_STEP_SIZE:
        raise ValueError(
            f"{where} {size_name} must be a finite number in [0, {MAX_STEP_SIZE:g}], "
            f"got {step_size!r}"
        )


def check_plausibility(value: object, where: str = "re_control_plausibility") -> None:
    """ValueError naming the field unless value is a number in [0, 1)."""
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or not 0 <= value < 1:
        raise ValueError(f"{where} must be a number in [0, 1), got {value!r}")


class ValueNetwork(nn.Module):
    """V: final-norm hidden state (..., H) → predicted probe logits of the continuation (..., K);
    `depth` hidden layers of Linear + ReLU, then a Linear output layer."""

    def __init__(self, config: ValueNetConfig) -> None:
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.hidden_dim] * config.depth + [config.outputs]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.layers[0].weight.dtype)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x).float()


def value_ascent(
    h: torch.Tensor,
    net: ValueNetwork,
    coef: torch.Tensor,
    steps: torch.Tensor,
    step_size: torch.Tensor,
    max_steps: int,
    native: bool | None = None,
) -> torch.Tensor:
    """`max_steps` gradient-ascent steps on J(h) = Σ_k [coef_k ≠ 0] log σ(coef_k · V_k(h)), the
    gradient of the ReLU MLP computed analytically → edited states (R, H) fp32.

    h (R, H); coef (R, K) fp32: ±1 on the targeted outputs (+ for label 1), 0 elsewhere; steps
    (R,) long: row r moves during its first steps[r] steps only; step_size (R, 1) fp32.
    native: the C++ loop (dglm.kernels.value_edit; CPU) instead of this PyTorch form, which is
    its reference; None = C++ when on CPU, built, and for at most NATIVE_MAX_ROWS rows (beyond,
    the batched products of this form are faster)."""
    ws = [layer.weight.float() for layer in net.layers]  # (out, in)
    bs = [layer.bias.float() for layer in net.layers]
    if native is None:
        cpu = h.device.type == "cpu" and value_edit.available()
        native = cpu and h.shape[0] <= NATIVE_MAX_ROWS
    if native:
        return value_edit.value_ascent(h, ws, bs, coef, steps, step_size, max_steps)
    h = h.float()
    for i in range(max_steps):
        masks, x = [], h
        for w, b in zip(ws[:-1], bs[:-1], strict=True):
            z = torch.addmm(b, x, w.T)
            masks.append(z > 0)
            x = z.clamp_min(0)
        v = torch.addmm(bs[-1], x, ws[-1].T)  # (R, K)
        # d/dv log σ(c v) = c σ(−c v); zero where c = 0
        g = coef * torch.sigmoid(-coef * v)  # (R, K)
        g = g @ ws[-1]  # (R, hidden)
        for w, m in zip(reversed(ws[:-1]), reversed(masks), strict=True):
            g = (g * m) @ w  # through the ReLU, then the layer
        move = (steps > i).float()[:, None] * step_size  # (R, 1)
        h = h + move * g
    return h


@dataclass
class RowEdit:
    """One control's edit on some rows: the probe's value network, its targets, n and α."""

    net: ValueNetwork
    coef: torch.Tensor  # (R, K) ±1 / 0
    steps: torch.Tensor  # (R,) long
    step_size: torch.Tensor  # (R, 1) fp32


class ValueEdit(HiddenHook):
    """The `HiddenHook` of one batch of R rows: every value network's edit, applied in turn to the
    final-norm hidden states (R' ≥ R, T, H) of each step; rows past R and rows with no edit pass
    through unchanged (bit-identical). The decode loop extends it to its companion rows
    (`with_companions`).

    plausibility (R,) fp32, optional: β per row (0 = off); rows with β > 0 that the hook edits
    have their unedited last-position states kept each step (`unedited`) for `PlausibleEdit`.
    extends: the hook this one extends to companion rows (`with_companions`): its masked rows and
    what each step's call saw are that hook's, so its readers see this one's steps."""

    def __init__(
        self,
        edits: list[RowEdit],
        rows: int,
        plausibility: torch.Tensor | None = None,
        *,
        extends: ValueEdit | None = None,
    ) -> None:
        if not edits:
            raise ValueError("ValueEdit needs at least one edit: decode without the hook")
        self.edits, self.rows = edits, rows
        self.max_steps = [int(e.steps.max()) for e in edits]  # host-side, once
        device = edits[0].coef.device
        active = torch.zeros(rows, dtype=torch.bool, device=device)
        for e in edits:
            active |= (e.steps > 0) & (e.coef != 0).any(-1) & (e.step_size[:, 0] > 0)
        self.active = active  # (R,)
        if plausibility is None:
            plausibility = torch.zeros(rows, device=device)
        if plausibility.shape != (rows,):
            raise ValueError(f"plausibility has shape {tuple(plausibility.shape)}, want ({rows},)")
        self.plausibility = plausibility.float()
        # what this step's call saw, shared with the hook's companion-row extension
        self._seen: dict[str, torch.Tensor] = {}
        if extends is not None:
            self.masked, self._seen = extends.masked, extends._seen
        else:
            masked = (active & (self.plausibility > 0)).nonzero()[:, 0]  # host-side, once
            self.masked = masked if masked.numel() else None  # rows PlausibleEdit masks

    @property
    def unedited(self) -> torch.Tensor:
        """The last call's unedited final-norm states at the last position of the masked rows
        (M, H), M = len(self.masked)."""
        if "unedited" not in self._seen:
            raise RuntimeError("the hook has not run this step: decode through decoding.generate")
        return self._seen["unedited"]

    def head_extra(self) -> torch.Tensor | None:
        """The states whose logits `Decoder.hooked_logits` computes beside the edited ones: the
        masked rows' unedited states (M, H), or None without a mask."""
        return None if self.masked is None else self.unedited

    def see_head_extra(self, logits: torch.Tensor) -> None:
        """Their logits (M, V) from that LM-head call, for `PlausibleEdit`."""
        self._seen["unedited_logits"] = logits

    def unedited_logits(self, logits_fn) -> torch.Tensor:
        """This step's logits (M, V) of the masked rows' unedited states: those the LM-head call
        computed, else through `logits_fn` (a path that ran the LM head apart)."""
        got = self._seen.get("unedited_logits")
        return got if got is not None else logits_fn(self.unedited[:, None])[:, 0]

    def with_companions(self, follow: list[int]) -> ValueEdit:
        """This edit over the batch's rows and then companion rows, companion j edited as the row
        follow[j] is (prompt guidance's unconditional stream: the edit then acts on the decoder
        both streams share, and the guidance amplifies the soft prompt's effect, not the edit's)."""
        index = torch.tensor(follow, device=self.active.device)

        def extend(t: torch.Tensor) -> torch.Tensor:
            return torch.cat((t, t[index]))

        edits = [
            RowEdit(e.net, extend(e.coef), extend(e.steps), extend(e.step_size)) for e in self.edits
        ]
        # companions are not masked (PlausibleEdit acts on the batch's own rows)
        quiet = torch.zeros(len(follow), device=self.plausibility.device)
        plausibility = torch.cat((self.plausibility, quiet))
        return ValueEdit(edits, self.rows + len(follow), plausibility, extends=self)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        R = self.rows
        if hidden.shape[0] < R:
            raise ValueError(f"ValueEdit was built for {R} rows, the step has {hidden.shape[0]}")
        own = hidden[:R]  # (R, T, H)
        if self.masked is not None:
            self._seen["unedited"] = own[self.masked, -1]
            self._seen.pop("unedited_logits", None)  # this step's come with the LM head, if at all
        out = _edit_rows(own, self.edits, self.max_steps, self.active)
        return out if hidden.shape[0] == R else torch.cat((out, hidden[R:]))

    # ---- the capturable form (decoding.runner captures it in CUDA graphs)
    def static_key(self) -> tuple:
        """What a graph recording this hook's static form depends on beyond its per-row values:
        the value networks, their step counts (the unrolled loop's length) and whether the
        plausibility mask needs the unedited logits."""
        return (
            tuple(id(e.net) for e in self.edits),
            tuple(self.max_steps),
            self.masked is not None,
        )

    def static_copy(self, capacity: int) -> StaticValueEdit:
        """This hook's static form over buffers of `capacity` rows (empty until `load`)."""
        return StaticValueEdit(self, capacity)


def _edit_rows(
    own: torch.Tensor, edits: list[RowEdit], max_steps: list[int], active: torch.Tensor
) -> torch.Tensor:
    """Rows (R, T, H) after every edit (row r's settings at its T positions); rows not `active`
    come back bit-identical."""
    R, T, H = own.shape
    h = own.reshape(R * T, H)
    edited = h.float()
    for e, n in zip(edits, max_steps, strict=True):
        if n == 0:
            continue
        per_pos = (t.repeat_interleave(T, 0) for t in (e.coef, e.steps, e.step_size))
        edited = value_ascent(edited, e.net, *per_pos, n)
    keep = active.repeat_interleave(T)[:, None]
    return torch.where(keep, edited.to(own.dtype), h).reshape(R, T, H)


class StaticValueEdit(StaticHook):
    """A `ValueEdit`'s static form: its per-row tensors in buffers of `capacity` rows, refilled
    for each batch by `load` — what the decode runner records in a CUDA graph (one per batch
    bucket, KV bucket and `ValueEdit.static_key`) and replays for every batch whose hook has that
    key. A call on b ≤ capacity rows edits them with the buffers' first b rows; rows the loaded
    hook lacks (the bucket's padding) have no steps and pass through unchanged. No host sync and
    no shape that depends on the batch: with the plausibility mask, the unedited states of all b
    rows go through the same LM-head call as the edited ones (`head_extra`), their logits are
    copied into a buffer, and `publish`, after each step, hands the loaded hook its masked rows'
    (what `PlausibleEdit` reads)."""

    def __init__(self, like: ValueEdit, capacity: int) -> None:
        device = like.active.device
        self.capacity, self.key = capacity, like.static_key()
        self.max_steps = list(like.max_steps)
        self.edits = [
            RowEdit(
                e.net,
                torch.zeros(capacity, e.coef.shape[1], device=device),
                torch.zeros(capacity, dtype=torch.long, device=device),
                torch.zeros(capacity, 1, device=device),
            )
            for e in like.edits
        ]
        self.active = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.masked = like.masked is not None
        self.extra: torch.Tensor | None = None  # (capacity, V) unedited logits, at the first call
        self._unedited: torch.Tensor | None = None
        self.source: ValueEdit | None = None

    def load(self, hook: HiddenHook) -> None:
        """Copy `hook`'s per-row settings into the buffers (rows past it: inactive)."""
        if not isinstance(hook, ValueEdit) or hook.static_key() != self.key:
            raise ValueError("this static edit was built for another set of value networks")
        R = hook.rows
        if R > self.capacity:
            raise ValueError(f"the hook has {R} rows, the static edit holds {self.capacity}")
        for mine, theirs in zip(self.edits, hook.edits, strict=True):
            for buf, t in ((mine.coef, theirs.coef), (mine.steps, theirs.steps),
                           (mine.step_size, theirs.step_size)):  # fmt: skip
                buf[:R].copy_(t)
                buf[R:].zero_()
        self.active[:R].copy_(hook.active)
        self.active[R:] = False
        self.source = hook

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        b = hidden.shape[0]
        if b > self.capacity:
            raise ValueError(f"the static edit holds {self.capacity} rows, the step has {b}")
        if self.masked:
            self._unedited = hidden[:, -1]
        edits = [RowEdit(e.net, e.coef[:b], e.steps[:b], e.step_size[:b]) for e in self.edits]
        return _edit_rows(hidden, edits, self.max_steps, self.active[:b])

    def head_extra(self) -> torch.Tensor | None:
        """Every row's unedited last state (b, H) when the mask is on (see the class)."""
        return self._unedited if self.masked else None

    def see_head_extra(self, logits: torch.Tensor) -> None:
        if self.extra is None:
            self.extra = torch.zeros(self.capacity, logits.shape[-1], device=logits.device)
        self.extra[: logits.shape[0]].copy_(logits)

    def publish(self) -> None:
        """After a step: the loaded hook's masked rows' unedited logits, for `PlausibleEdit`."""
        hook = self.source
        if hook is not None and hook.masked is not None and self.extra is not None:
            hook.see_head_extra(self.extra[hook.masked])


class PlausibleEdit:
    """The plausibility mask around a `ValueEdit` (a `LogitsProcessor`): on each masked row, the
    step's scores are kept on tokens with p_unedited ≥ β · max p_unedited and set to −inf elsewhere,
    p_unedited the decoder's distribution from the row's unedited state (one LM-head product per
    masked row per step, through `logits_fn`, the decoder's `logits`). A row whose scores would
    have no token left (another processor ruled out every plausible one) keeps its scores. Runs
    after prompt guidance's processor (`PromptGuidance`), on the guided scores."""

    def __init__(self, hook: ValueEdit, logits_fn) -> None:
        if hook.masked is None:
            raise ValueError("no row of the hook has plausibility > 0: decode without the mask")
        self.hook, self.logits_fn = hook, logits_fn
        self.index = hook.masked
        self.every_row = hook.masked.tolist() == list(range(hook.rows))  # host-side, once
        self.log_beta = hook.plausibility[hook.masked].log()[:, None]  # (M, 1)

    def __call__(
        self, logits: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor
    ) -> torch.Tensor:
        # p_u ≥ β · max p_u ⇔ logit_u ≥ max logit_u + log β: no softmax needed
        base = self.hook.unedited_logits(self.logits_fn)  # (M, V) fp32
        keep = base >= base.amax(dim=-1, keepdim=True) + self.log_beta
        every = self.every_row and logits.shape[0] == keep.shape[0]
        rows = logits if every else logits[self.index]
        masked = rows.masked_fill(~keep, float("-inf"))
        empty = torch.isneginf(masked.amax(dim=-1, keepdim=True))  # no host read
        masked = torch.where(empty, rows, masked)
        return masked if every else logits.index_copy(0, self.index, masked)


def row_edits(
    nets: dict[str, ValueNetwork],
    probes: dict[str, Probe],
    controls_per_row: list[tuple[Control, ...]],
    settings_per_row: list[tuple[int, float, float]],
    device: torch.device,
) -> list[RowEdit]:
    """One RowEdit per value network some row's controls use: controls_per_row are the controls
    that act through RE-Control on each row; settings_per_row each row's (steps, step_size,
    plausibility) from `edit_settings` (the plausibility goes to the hook, not the edit)."""
    R = len(controls_per_row)
    used = sorted({c.probe for cs in controls_per_row for c in cs})
    edits = []
    for name in used:
        if name not in nets:
            have = sorted(nets) or "none"
            raise ValueError(
                f"controls: probe {name!r} has no value network for RE-Control in this bundle "
                f"(value networks: {have}); train one with `dglm train value`"
            )
        net = nets[name]
        coef = torch.zeros(R, net.config.outputs)
        steps = torch.zeros(R, dtype=torch.long)
        size = torch.zeros(R, 1)
        for r, controls in enumerate(controls_per_row):
            for c in controls:
                if c.probe != name:
                    continue
                for row, y in probes[name].target_rows(c.target):
                    coef[r, row] = 1.0 if y == 1.0 else -1.0
                steps[r], size[r, 0] = settings_per_row[r][:2]
        edits.append(RowEdit(net, coef.to(device), steps.to(device), size.to(device)))
    return edits


def edit_settings(
    p: GenerationParams, net: ValueNetwork | None, with_dglm: bool = False
) -> tuple[int, float, float]:
    """A request's (steps, step_size, plausibility): its own, else its value network's defaults
    (with_dglm: the control acts through DGLM too, see ValueNetConfig.step_size_with_dglm and
    plausibility_with_dglm)."""
    steps = p.re_control_steps
    size = p.re_control_step_size
    beta = p.re_control_plausibility
    c = net.config if net is not None else None
    if steps is None:
        steps = c.steps if c is not None else DEFAULT_STEPS
    if size is None:
        size = c.step_size if c is not None else DEFAULT_STEP_SIZE
        if with_dglm and c is not None and c.step_size_with_dglm is not None:
            size = c.step_size_with_dglm
    if beta is None:
        beta = c.plausibility if c is not None else 0.0
        if with_dglm and c is not None and c.plausibility_with_dglm is not None:
            beta = c.plausibility_with_dglm
    return steps, size, beta


def value_conditioning(
    nets: dict[str, ValueNetwork],
    probes: dict[str, Probe],
    batch: MethodBatch,
    every_control: bool,
    device: torch.device,
    logits_fn,
) -> tuple[ValueEdit | None, tuple[PlausibleEdit, ...]]:
    """The hook for a batch and, when a row asks for plausibility > 0, its `PlausibleEdit`
    processor (logits_fn: the decoder's `logits`, the LM head) → (hook or None, processors). The
    controls that act on hidden states (`Control.hidden`; every control with `every_control`) act
    through their value networks; the hook is None when no row has one."""
    per_row, settings = [], []
    for i, _ in batch.rows:
        p = batch.params[i]
        controls = tuple(c for c in p.controls if every_control or c.hidden)
        per_row.append(controls)
        net = nets.get(controls[0].probe) if controls else None
        with_dglm = not every_control and any(c.latent for c in controls)
        settings.append(edit_settings(p, net, with_dglm))
    if not any(per_row):
        return None, ()
    edits = row_edits(nets, probes, per_row, settings, device)
    beta = [b if cs else 0.0 for cs, (_, _, b) in zip(per_row, settings, strict=True)]
    hook = ValueEdit(edits, len(per_row), torch.tensor(beta, device=device))
    if not bool(hook.active.any()):
        return None, ()
    if hook.masked is None:
        return hook, ()
    if logits_fn is None:
        raise ValueError(
            "re_control_plausibility > 0 needs the decoder's LM head, which this backend does "
            "not expose: pass re_control_plausibility=0"
        )
    return hook, (PlausibleEdit(hook, logits_fn),)


class ReControl(Method):
    """RE-Control on its own: the prefix decoded by `decoder` (no soft prompt, no diffusion), each
    row's final-norm hidden states edited toward its controls' targets by their value networks
    (every control of a request acts through RE-Control, whatever its `method`)."""

    name = "re-control"

    def __init__(self, nets: dict[str, ValueNetwork], probes: ProbeSet) -> None:
        """nets: the value networks by probe; probes: the bundle's probes (their targets). The
        decoder's LM head, which requests with plausibility > 0 need, comes with each batch."""
        self.nets, self.probes = nets, probes

    def validate(self, params: list[GenerationParams]) -> None:
        for i, p in enumerate(params):
            self.probes.validate(p.controls)
            for c in p.controls:
                if c.probe not in self.nets:
                    raise ValueError(
                        f"params[{i}].controls: probe {c.probe!r} has no value network "
                        f"(value networks: {sorted(self.nets) or 'none'})"
                    )

    def condition(self, batch: MethodBatch) -> Conditioning:
        device = next(iter(self.nets.values())).layers[0].weight.device if self.nets else "cpu"
        hook, processors = value_conditioning(
            self.nets, self.probes.probes, batch, True, torch.device(device), batch.lm_head
        )
        return Conditioning(hidden_hook=hook, processors=processors)


__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_STEP_SIZE",
    "MAX_STEPS",
    "MAX_STEP_SIZE",
    "PlausibleEdit",
    "VALUE_NET_PRESETS",
    "ReControl",
    "RowEdit",
    "StaticValueEdit",
    "ValueEdit",
    "ValueNetConfig",
    "ValueNetwork",
    "check_edit",
    "check_plausibility",
    "edit_settings",
    "row_edits",
    "value_ascent",
    "value_conditioning",
]
