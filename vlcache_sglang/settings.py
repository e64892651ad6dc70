"""Server-wide and per-request compression settings (no SGLang import).

Launch time, either on the stock command line (flags added by the plugin)::

    python -m sglang.launch_server ... --attention-backend vlcache \\
        --vlcache-budget 0.1 --vlcache-method vlcache --vlcache-config tuned.json

or through the environment (``VLCACHE_BUDGET``, ``VLCACHE_METHOD``, ``VLCACHE_CONFIG``,
``VLCACHE_SHARING``; and the engine knobs of :class:`ServerSettings`). The launcher reads flags and
environment once (:func:`launch_settings`, the plugin boundary) into one frozen
:class:`ServerSettings`, which travels to every SGLang process on ``server_args`` (see
:func:`attach` / :func:`settings_of`); nothing below reads the environment.

Per request, inside ``custom_params`` (OpenAI ``extra_body={"custom_params": {...}}`` or
``/generate``'s ``sampling_params.custom_params``)::

    {"vlcache": {"budget": 0.05, "method": "snapkv"}}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from vlcache_sglang.policy.methods import available_methods

ENV_BUDGET = "VLCACHE_BUDGET"
ENV_METHOD = "VLCACHE_METHOD"
ENV_CONFIG = "VLCACHE_CONFIG"
ENV_SHARING = "VLCACHE_SHARING"
REQUEST_KEY = "vlcache"
#: Request keys that are not policy fields: ``return_plan`` adds the kept positions per layer to
#: the response's ``meta_info`` (``vlcache_kept_positions``), for tests and debugging; ``sharing``
#: picks how the radix tree shares this request's KV (see :data:`SHARING_MODES`).
REQUEST_ONLY_KEYS = frozenset({"return_plan", "sharing"})
#: Radix sharing of compressing requests (with the ``vlcache`` radix cache):
#: ``off`` (default): nothing of a compressing request enters the tree; all of its own prompt is
#: compacted, so it holds only its kept cells, and its answer never depends on what is cached;
#: ``prefix``: the uncompressed prefix before the statistics window enters the tree (shared with
#: every request) and stays in place: each question selects from the full image exactly as
#: unshared, but the image is held uncompressed (good for many questions on one image, no memory
#: saving for an image asked about once);
#: ``compressed``: the compressed prompt and answer enter the tree under a namespace keyed by the
#: policy, so later turns and repeats reuse the compressed KV (smallest, but selected without the
#: new question: a repeat's first token is computed over the compressed cache).
SHARING_MODES = ("off", "prefix", "compressed")


class SettingsError(ValueError):
    """A compression setting is invalid; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class CompressionSettings:
    """What a request is compressed with: budget ratio alpha, method, extra policy fields."""

    budget: float = 1.0
    method: str = "vlcache"
    config_path: str | None = None
    sharing: str = "off"
    policy_overrides: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> "CompressionSettings":
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0.0 < b <= 1.0:
            raise SettingsError(f"vlcache budget must be a number in (0, 1], got {b!r}")
        methods = available_methods()  # the registry: third-party methods count too
        if self.method not in methods:
            raise SettingsError(f"vlcache method must be one of {', '.join(methods)}; got {self.method!r}")
        if self.config_path is not None and not os.path.isfile(self.config_path):
            raise SettingsError(f"vlcache config file not found: {self.config_path!r}")
        if self.sharing not in SHARING_MODES:
            raise SettingsError(f"vlcache sharing must be one of {', '.join(SHARING_MODES)}; got {self.sharing!r}")
        return self

    @property
    def compresses(self) -> bool:
        return self.budget < 1.0 and self.method != "full"

    # -- sources --------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "CompressionSettings":
        kwargs: dict[str, Any] = {}
        if environ.get(ENV_BUDGET):
            try:
                kwargs["budget"] = float(environ[ENV_BUDGET])
            except ValueError:
                raise SettingsError(f"{ENV_BUDGET} must be a number in (0, 1], got {environ[ENV_BUDGET]!r}") from None
        if environ.get(ENV_METHOD):
            kwargs["method"] = environ[ENV_METHOD]
        if environ.get(ENV_CONFIG):
            kwargs["config_path"] = environ[ENV_CONFIG]
        if environ.get(ENV_SHARING):
            kwargs["sharing"] = environ[ENV_SHARING]
        return cls(**kwargs).validate()

    def to_env(self) -> dict[str, str]:
        env = {ENV_BUDGET: repr(float(self.budget)), ENV_METHOD: self.method, ENV_SHARING: self.sharing}
        if self.config_path:
            env[ENV_CONFIG] = os.path.abspath(self.config_path)
        return env

    def with_request(self, custom_params: Mapping[str, Any] | None) -> "CompressionSettings":
        """These settings overridden by a request's ``custom_params["vlcache"]`` (validated)."""
        overrides = parse_request_overrides(custom_params)
        if not overrides:
            return self
        policy = dict(self.policy_overrides)
        policy.update({k: v for k, v in overrides.items()
                       if k not in ("budget", "method") and k not in REQUEST_ONLY_KEYS})
        return replace(
            self, budget=overrides.get("budget", self.budget), method=overrides.get("method", self.method),
            sharing=overrides.get("sharing", self.sharing), policy_overrides=policy,
        ).validate()

    def describe(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {})}, sort_keys=True)


def parse_request_overrides(custom_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extract and type-check ``custom_params["vlcache"]``; raises :class:`SettingsError`."""
    if not custom_params or REQUEST_KEY not in custom_params:
        return {}
    raw = custom_params[REQUEST_KEY]
    if not isinstance(raw, Mapping):
        raise SettingsError(f'custom_params["{REQUEST_KEY}"] must be an object like {{"budget": 0.1}}, got {raw!r}')
    out = dict(raw)
    for key, value in out.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (bool, int, float, str))):
            raise SettingsError(f'custom_params["{REQUEST_KEY}"][{key!r}] must be a JSON scalar, got {value!r}')
    if "budget" in out:
        CompressionSettings(budget=out["budget"]).validate()
    if "method" in out:
        CompressionSettings(method=out["method"]).validate()
    if "sharing" in out:
        CompressionSettings(sharing=out["sharing"]).validate()
    return out


# -- one frozen settings object per server -----------------------------------------------
ENV_DEBUG_CHECKS = "VLCACHE_DEBUG_CHECKS"
ENV_CUDA_EXECUTOR = "VLCACHE_CUDA_EXECUTOR"
ENV_COMPRESSED_DECODE = "VLCACHE_COMPRESSED_DECODE"
ENV_VIRTUAL_IDS_PER_SLOT = "VLCACHE_VIRTUAL_IDS_PER_SLOT"
ENV_KERNELS = "VLCACHE_KERNELS"
ENV_CELLS = "VLCACHE_CELLS"
ENV_KERNEL_LAUNCHES = "VLCACHE_KERNEL_LAUNCHES"
#: ``VLCACHE_KERNEL_LAUNCHES`` words (anything else is a path to a launch file,
#: :mod:`vlcache_sglang.kernels.launch_configs`)
KERNEL_LAUNCH_CHOICES = ("auto", "defaults")
#: KV cell granularity of a server: ``layer`` (a slot's ``L`` rows are cells, every KV head of a
#: layer keeps the same positions; head-granularity plans hold the union over heads) or ``head``
#: (a slot's ``L * H`` (layer, KV head) rows are cells: per-head plans are held per head)
CELL_MODES = ("layer", "head")
CUDA_EXECUTORS = ("stock", "flashinfer", "torch")
#: the CUDA executors that compress: ``flashinfer`` (FlashInfer + the plan-free Triton decode, decode
#: CUDA graphs) and ``torch`` (the CPU path's SDPA executor on the GPU: any dtype and head dim, e.g.
#: float32, which FlashInfer has no kernels for; eager only)
COMPRESSING_CUDA_EXECUTORS = ("flashinfer", "torch")
COMPRESSED_DECODES = ("triton", "flashinfer")
KERNEL_MODES = ("auto", "torch", "triton")
#: the attribute of SGLang's ``ServerArgs`` that carries :class:`ServerSettings` to every process
#: (``ServerArgs.__reduce__`` pickles its ``__dict__`` with the fields: the scheduler, TP ranks
#: and the detokenizer receive it with the server args)
SERVER_ARGS_ATTR = "_vlcache_settings"
#: the attribute holding the raw ``--vlcache-*`` flags between ``from_cli_args`` and resolution
FLAGS_ATTR = "_vlcache_flags"


@dataclass(frozen=True)
class ServerSettings:
    """Everything a vlcache server was launched with, parsed and validated once.

    ``compression`` are the request defaults (budget, method, policy file, sharing); the rest are
    engine knobs read at launch from the environment:

    * ``debug_checks`` (``VLCACHE_DEBUG_CHECKS=1``): freed-KV read checks, plans from incomplete
      statistics raise, tensor-parallel ranks compare plans;
    * ``cuda_executor`` (``VLCACHE_CUDA_EXECUTOR``): ``stock`` serves CUDA with SGLang's FlashInfer
      backend uncompressed, ``flashinfer`` runs the compressing per-layer executor, ``torch`` the
      compressing SDPA executor (eager; float32 and head dims FlashInfer lacks);
    * ``compressed_decode`` (``VLCACHE_COMPRESSED_DECODE``): the CUDA decode path of compacted
      batches (the plan-free Triton kernel or per-layer FlashInfer plans);
    * ``virtual_ids_per_slot`` (``VLCACHE_VIRTUAL_IDS_PER_SLOT``): size of the virtual-id table
      (charged in SGLang's pool budget, :mod:`vlcache_sglang.backend.memory_budget`);
    * ``kernels`` (``VLCACHE_KERNELS``): ``auto`` (Triton on CUDA), ``torch`` or ``triton``;
    * ``compresses``: whether this server's backend compresses at all (False on CUDA with the
      stock executor), decided at launch for the HTTP process's request checks;
    * ``metrics``: ``--enable-metrics`` (Prometheus counters of compression);
    * ``cells`` (``--vlcache-cells`` / ``VLCACHE_CELLS``): KV cell granularity, :data:`CELL_MODES`;
    * ``kernel_launches`` (``VLCACHE_KERNEL_LAUNCHES``): the Triton kernels' launch options on CUDA,
      ``auto`` (the GPU model's tuned file in ``kernels/tuned_launches/`` if one is shipped, else the
      defaults), ``defaults``, or a path to a launch file (checked at launch).
    """

    compression: CompressionSettings = field(default_factory=CompressionSettings)
    debug_checks: bool = False
    cuda_executor: str = "stock"
    compressed_decode: str = "triton"
    virtual_ids_per_slot: float = 4.0
    kernels: str = "auto"
    compresses: bool = True
    metrics: bool = False
    cells: str = "layer"
    kernel_launches: str = "auto"
    tp_size: int = 1  # the launch's --tp-size (head cells share compressed prefixes only at 1)

    def validate(self) -> "ServerSettings":
        self.compression.validate()
        if self.cells not in CELL_MODES:
            raise SettingsError(f"--vlcache-cells must be one of {', '.join(CELL_MODES)}; got {self.cells!r}")
        check_request_sharing(self, self.compression.sharing)
        for name, allowed, env in (("cuda_executor", CUDA_EXECUTORS, ENV_CUDA_EXECUTOR),
                                   ("compressed_decode", COMPRESSED_DECODES, ENV_COMPRESSED_DECODE),
                                   ("kernels", KERNEL_MODES, ENV_KERNELS)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{env} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.kernel_launches not in KERNEL_LAUNCH_CHOICES:
            from vlcache_sglang.kernels.launch_configs import LaunchConfigError, load_launches

            try:
                load_launches(self.kernel_launches)  # a bad file stops the launch, not the first request
            except LaunchConfigError as exc:
                raise SettingsError(f"{ENV_KERNEL_LAUNCHES}: {exc} (use auto, defaults, or a file written by "
                                    "python -m vlcache_sglang.tooling.adopt_kernel_sweeps)") from None
        v = self.virtual_ids_per_slot
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SettingsError(f"{ENV_VIRTUAL_IDS_PER_SLOT} must be a positive number, got {v!r}")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str], compression: CompressionSettings | None = None,
                 **fields: Any) -> "ServerSettings":
        """The engine knobs from ``environ`` (the launcher's environment; nowhere else)."""
        knobs: dict[str, Any] = {"debug_checks": environ.get(ENV_DEBUG_CHECKS) == "1"}
        for name, env in (("cuda_executor", ENV_CUDA_EXECUTOR), ("compressed_decode", ENV_COMPRESSED_DECODE),
                          ("kernels", ENV_KERNELS), ("cells", ENV_CELLS)):
            if environ.get(env):
                knobs[name] = environ[env].strip().lower()
        if environ.get(ENV_KERNEL_LAUNCHES, "").strip():
            raw = environ[ENV_KERNEL_LAUNCHES].strip()
            knobs["kernel_launches"] = raw.lower() if raw.lower() in KERNEL_LAUNCH_CHOICES else raw
        if environ.get(ENV_VIRTUAL_IDS_PER_SLOT):
            try:
                knobs["virtual_ids_per_slot"] = float(environ[ENV_VIRTUAL_IDS_PER_SLOT])
            except ValueError:
                raise SettingsError(f"{ENV_VIRTUAL_IDS_PER_SLOT} must be a positive number, "
                                    f"got {environ[ENV_VIRTUAL_IDS_PER_SLOT]!r}") from None
        knobs.update(fields)
        return cls(compression=compression or CompressionSettings.from_env(environ), **knobs).validate()

    def describe(self) -> str:
        out = json.loads(self.compression.describe())
        out.update({k: v for k, v in asdict(self).items() if k != "compression"})
        return json.dumps(out, sort_keys=True)


#: why head cells refuse ``compressed`` sharing under tensor parallelism (launch default or per request)
HEAD_CELLS_SHARING_TP = ("vlcache sharing 'compressed' with --vlcache-cells head is served at --tp-size 1 only "
                         "(each rank holds other KV heads, so no rank can report what a request reusing a "
                         "per-head compressed prefix keeps); use sharing 'prefix' or 'off', --tp-size 1, "
                         "or --vlcache-cells layer")


def check_request_sharing(server: ServerSettings, sharing: str) -> None:
    """A request's sharing mode against the server's cells (raises :class:`SettingsError`)."""
    if server.cells == "head" and sharing == "compressed" and server.tp_size > 1:
        raise SettingsError(HEAD_CELLS_SHARING_TP)


def attach(server_args: Any, settings: ServerSettings) -> ServerSettings:
    """Hand ``settings`` to every process of this server: they travel on ``server_args``."""
    setattr(server_args, SERVER_ARGS_ATTR, settings)
    return settings


def settings_of(server_args: Any) -> ServerSettings | None:
    """The settings this server was launched with (None: not a vlcache launch, or no server args)."""
    return getattr(server_args, SERVER_ARGS_ATTR, None) if server_args is not None else None


def launch_settings(flags: Mapping[str, Any], environ: Mapping[str, str], model_path: str | None,
                    *, metrics: bool = False) -> tuple[ServerSettings, str | None]:
    """Parse and validate a launch once: ``(settings, where the policy file came from)``.

    Precedence (later wins): defaults < the policy file < the environment < ``--vlcache-*`` flags
    (< each request's ``custom_params``). Without ``--vlcache-config`` / ``VLCACHE_CONFIG`` the
    model's tuned default policy is used (:mod:`vlcache_sglang.tuned_configs`; ``none`` disables
    it); a policy file in force gives the budget and method unless a flag or variable sets them.
    Raises :class:`SettingsError` with a readable message (the launch stops)."""
    from vlcache_sglang.tuned_configs import DISABLED, TunedConfigError, find_default_config, load_policy_file

    base = CompressionSettings.from_env({k: v for k, v in environ.items() if k != ENV_CONFIG})
    explicit = flags.get("config") or environ.get(ENV_CONFIG) or None
    config_path, source = None, None
    if explicit is not None and explicit.strip().lower() == DISABLED:
        pass
    elif explicit is not None:
        config_path, source = explicit, "--vlcache-config"
    elif model_path:
        found = find_default_config(model_path, environ)
        if found is not None:
            config_path, source = str(found), f"per-model default for {model_path}"
    budget = flags["budget"] if flags.get("budget") is not None else base.budget
    method = flags.get("method") or base.method
    if config_path is not None and os.path.isfile(config_path):
        try:
            policy = load_policy_file(config_path)
        except TunedConfigError as exc:
            hint = " (pass --vlcache-config none to launch without it)" if source != "--vlcache-config" else ""
            raise SettingsError(f"{exc}{hint}") from None
        if flags.get("budget") is None and not environ.get(ENV_BUDGET):
            budget = policy.alpha
        if not (flags.get("method") or environ.get(ENV_METHOD)):
            method = policy.method
    sharing = flags.get("sharing") or base.sharing
    if config_path is not None:
        config_path = os.path.abspath(config_path)
    compression = replace(base, budget=budget, method=method, config_path=config_path, sharing=sharing)
    fields: dict[str, Any] = {"metrics": metrics}
    if flags.get("cells"):
        fields["cells"] = str(flags["cells"]).strip().lower()
    return ServerSettings.from_env(environ, compression.validate(), **fields), source
