"""Checks of a run config, before any model is loaded or compiled: one `ConfigError` line naming the key
and the fix. `check_static` needs nothing but the config; `check_against_model` the model's config.json;
`check_mesh` the devices. Imports nothing from the trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxsae import phases as P
from jaxsae.config import ConfigError, KLCfg, MSECfg, RunConfig, phase_batch_tokens, phase_tokens, section


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_static(cfg: RunConfig) -> None:
    """Checks that need no model or store (the rest is in `check_against_model`)."""
    for key in ("data.context", "data.window_shuffle_sequences", "store.tokens", "store.batch_contexts",
                "checkpoint.every_steps", "checkpoint.keep", "eval.sequences", "eval.batch_sequences"):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        need(v > 0, f"{key}={v} must be positive")
    need(cfg.data.context >= 2, f"data.context={cfg.data.context} must be at least 2")
    if cfg.store.mode == "stream" and "mse" in cfg.phases:
        # a window (what batches are drawn from) should mix rows of many batches' worth of contexts
        need(cfg.store.buffer_rows >= 2 * cfg.mse.batch_size,
             f"store.buffer_rows={cfg.store.buffer_rows} must be at least 2 x mse.batch_size ({cfg.mse.batch_size}): "
             "raise store.buffer_rows")
    init = cfg.finetune.init_from
    msg = P.check_phases(cfg.phases, has_init=bool(init))
    need(msg is None, msg or "")
    need(not (init and "mse" in cfg.phases),
         "finetune.init_from replaces the mse phase: set phases: [finetune] (or drop finetune.init_from)")
    need(not init or Path(init).exists(), f"finetune.init_from={init} does not exist: point it at an SAE directory")
    for name in cfg.phases:
        check_phase_section(cfg, name)
    need(cfg.mse.tokens <= cfg.store.tokens * 1000 or "mse" not in cfg.phases or cfg.store.mode == "stream",
         "mse.tokens is over 1000 epochs of the store: raise store.tokens")
    check_adapter(cfg)
    g = cfg.guard
    need(g.loss_ratio > 1, f"guard.loss_ratio={g.loss_ratio} must be > 1 (the loss's growth over its minimum that "
                           "stops a run; guard.enabled=false turns the guard off)")
    need(g.grace_steps >= 0, f"guard.grace_steps={g.grace_steps} must be >= 0")
    need(g.dead_steps >= 1, f"guard.dead_steps={g.dead_steps} must be >= 1")
    t = cfg.tracker
    need(t.kind != "wandb" or bool(t.project.strip()), "tracker.project must not be empty with tracker.kind=wandb")
    need(t.name is None or bool(t.name.strip()), "tracker.name must not be empty: leave it out (null) to use `name`")
    need(cfg.mesh.model >= 1, f"mesh.model={cfg.mesh.model} must be >= 1")
    need(cfg.mesh.data is None or cfg.mesh.data >= 1, f"mesh.data={cfg.mesh.data} must be >= 1 (or null: all)")
    need(cfg.sae.d_model == 0, f"sae.d_model={cfg.sae.d_model}: leave it out, it comes from the model")
    try:
        cfg.sae.validate(require_d_model=False)  # kind, k <= d_sae, penalties
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.sweep:
        from jaxsae.sweep import check

        check(cfg)


def check_phase_section(cfg: RunConfig, phase: str) -> None:
    """The settings of one listed phase: a positive budget of at least one batch, a sane optimiser."""
    name = P.get(phase).section
    sec = section(cfg, phase)
    batch_key = "batch_size" if isinstance(sec, MSECfg) else "batch_sequences"
    need(getattr(sec, batch_key) > 0, f"{name}.{batch_key}={getattr(sec, batch_key)} must be positive")
    need(sec.lr > 0, f"{name}.lr={sec.lr} must be positive")
    need(sec.tokens >= 0 if phase == "e2e" else sec.tokens > 0, f"{name}.tokens={sec.tokens} must be positive")
    need(sec.weight_decay >= 0 and sec.clip >= 0, f"{name}.weight_decay and {name}.clip must be >= 0")
    need(0.0 <= sec.decay_fraction <= 1.0, f"{name}.decay_fraction={sec.decay_fraction} must be in [0, 1]")
    per = phase_batch_tokens(cfg, phase)
    total = phase_tokens(cfg, phase) // per
    need(total >= 1, f"{name}.tokens={phase_tokens(cfg, phase)} is less than one batch ({per} tokens): raise it "
                     f"or drop the {phase} phase")
    if sec.schedule == "warmup_decay":
        decay_start = int(total * (1.0 - sec.decay_fraction))
        need(sec.warmup_steps <= decay_start,
             f"{name}.warmup_steps={sec.warmup_steps} runs past the decay start (step {decay_start} of {total}): "
             f"lower {name}.warmup_steps or raise {name}.tokens")
    if isinstance(sec, KLCfg):
        need(0.0 <= sec.kl_share <= 1.0, f"{name}.kl_share={sec.kl_share} must be in [0, 1]")
        n = sec.l0_probe_sequences
        need(isinstance(n, int) and n >= 0 and n % sec.batch_sequences == 0,
             f"{name}.l0_probe_sequences={n} must be 0 or a positive multiple of {name}.batch_sequences "
             f"({sec.batch_sequences})")
        if n:
            from jaxsae.sae.kinds import kind_of
            on = kind_of(cfg.sae).l1_controlled if sec.l1_controller is None else sec.l1_controller
            need(on and name == "finetune" and not cfg.sweep,
                 f"{name}.l0_probe_sequences={n} feeds the L1 controller of the fine-tune (or control) of one "
                 f"SAE with an L1 penalty (a ReLU kind, no sweep): set it to 0")


def check_adapter(cfg: RunConfig, d_model: int | None = None) -> None:
    a = cfg.adapter
    need(a.rank is None or a.rank >= 0, f"adapter.rank={a.rank} must be >= 0 (0 or null = full rank)")
    need(0.0 <= a.dropout < 1.0, f"adapter.dropout={a.dropout} must be in [0, 1): e.g. 0.1 (PEFT's lora_dropout)")
    need(a.dropout == 0.0 or a.kind == "sae_lora",
         f"adapter.dropout={a.dropout} applies to adapter.kind=sae_lora only: set adapter.dropout=0 for {a.kind}")
    need(d_model is None or (a.rank or 0) <= d_model,
         f"adapter.rank={a.rank} is over d_model={d_model}: use at most {d_model} (or 0 = full rank)")


def sae_config(cfg: RunConfig, d_model: int):
    """The SAE's own config (jaxsae.sae.SAEConfig) with d_model filled in from the model."""
    try:
        return dataclasses.replace(cfg.sae, d_model=d_model).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_against_model(cfg: RunConfig, n_layers: int, d_model: int) -> None:
    if not 0 <= cfg.hook.layer < n_layers:
        raise ConfigError(f"hook.layer={cfg.hook.layer} is out of range for a {n_layers}-layer model: "
                          f"choose 0..{n_layers - 1}")
    if "adapter" in cfg.phases and cfg.adapter.kind == "lm_lora" and cfg.adapter.lm_layers == "after" \
            and cfg.hook.layer == n_layers - 1:
        raise ConfigError("adapter.lm_layers=after adapts nothing with the hook after the last block: use all")
    check_adapter(cfg, d_model)
    sae_config(cfg, d_model)


def check_mesh(cfg: RunConfig, n_devices: int, n_processes: int = 1) -> tuple[int, int]:
    """(data, model) sizes of the mesh for `n_devices`, after checking that every batch splits evenly
    over the data axis (and over processes) and the latents over the model axis."""
    m = cfg.mesh.model
    if n_devices % m:
        raise ConfigError(f"mesh.model={m} does not divide the {n_devices} devices: choose a divisor of {n_devices}")
    data = cfg.mesh.data if cfg.mesh.data is not None else n_devices // m
    # a smaller explicit mesh uses the first data*model devices (one process only: a pod's mesh must
    # span every process)
    if data * m > n_devices or (data * m < n_devices and n_processes > 1):
        raise ConfigError(f"mesh.data={data} x mesh.model={m} = {data * m} devices, but there are {n_devices}: "
                          f"set mesh.data=null to use every device, or make the product {n_devices}")
    if data % n_processes:
        # each process feeds its own rows of every batch, so no two processes may share a data slice
        raise ConfigError(f"mesh.data={data} is not a multiple of the {n_processes} processes: make mesh.data a "
                          f"multiple of {n_processes} (and mesh.model = devices / mesh.data)")
    if cfg.store.mode == "stream" and n_processes > 1:
        raise ConfigError(f"store.mode=stream runs in one process today, not {n_processes}: use store.mode=disk for a "
                          "multi-host run (each host writes its own shards of the store)")
    split = data
    batches = {"mse.batch_size": cfg.mse.batch_size, "store.batch_contexts": cfg.store.batch_contexts,
               "eval.batch_sequences": cfg.eval.batch_sequences}
    for p in P.ordered(cfg.phases):
        if p.section != "mse":
            batches[f"{p.section}.batch_sequences"] = getattr(cfg, p.section).batch_sequences
    for key, b in batches.items():
        if b % split:
            raise ConfigError(f"{key}={b} does not split over mesh.data={data}: make it a multiple of {split}")
    if cfg.sae.d_sae % m:
        raise ConfigError(f"sae.d_sae={cfg.sae.d_sae} does not split over mesh.model={m}: make it a multiple of {m}")
    return data, m
