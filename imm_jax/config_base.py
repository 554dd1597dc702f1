"""Every option the trainer reads, with its default. Config files start from ``base_config()``.

Config files (configs/*.py) define ``get_config(arg)`` and change only what their setup needs, so one
place documents every field.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "imm"               # imm | flow_matching | moment_matching (imm_jax/objectives)
  c.num_steps = 1000
  c.batch_size = 128                # global batch over all devices and hosts (B)
  c.grad_accum_steps = 1            # micro-batches per step (each holds whole particle groups)
  c.log_every = 50                  # every *_every / .every below: 0 = only at the end of training
  c.sample_every = 500              # PNG + TensorBoard sample grids at config.sample.steps
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, keep_period=0, async_save=True))

  # Data: see imm_jax/data (digits | toy2d | images | tfds).
  c.data = ml_collections.ConfigDict(dict(
      name="digits", image_size=16, holdout=297, toy="checkerboard", toy_size=100_000, path="",
      holdout_fraction=0.02, tfds_name="", tfds_data_dir=ml_collections.config_dict.placeholder(str),
      split="train", eval_split="test", x_flip=False, worker_count=0, prefetch_buffer=2))

  # Non-leaking geometric augmentation of image batches in the training step (imm_jax/augment.py; EDM's
  # CIFAR-10 recipe: p=0.12, xflip=True, with config.model.augment_dim=9 so that the network is told
  # what was done and samples un-augmented images). p: probability of each of ``transforms``; xflip: a
  # labelled x-flip by a fair coin on every image (unlike data.x_flip, which flips without a label).
  c.augment = ml_collections.ConfigDict(dict(
      p=0.0, xflip=False, transforms=("yflip", "scale", "rotate", "aniso", "translate"), scale_std=0.2,
      aniso_std=0.2, translate_std=0.125))

  # Network: imm_jax.models.create_network (dit | unet | mlp); config files add the network's own
  # fields (DiT: preset or patch_size/hidden_size/depth/num_heads; unet: SongUNet's; mlp: hidden/depth).
  # How it is computed, with the same parameters: dtype (float32 | bfloat16 | float16; parameters and
  # the loss stay float32), remat (none | block | dots_saveable | dots_with_no_batch_dims_saveable:
  # recompute each block in the backward pass to save activation memory) and, for DiT, attention_impl
  # (None = XLA | xla | cudnn: cuDNN flash attention, NVIDIA GPUs with bf16/fp16 only). dit and unet also
  # take augment_dim (0, or 9 to be given config.augment's labels).
  c.model = ml_collections.ConfigDict(dict(name="dit", preset="S/2", class_conditional=False,
                                           augment_dim=0, dtype="float32", remat="none",
                                           attention_impl=ml_collections.config_dict.placeholder(str)))

  # Preconditioning (spec section 2).
  c.precond = ml_collections.ConfigDict(dict(
      interpolant="ot_fm", f_type="euler_fm", temb_type="identity", sigma_d=0.5, time_scale=1000.0))

  # The IMM objective (spec section 3). mapping: r(s, t) as a constant step towards the data in eta (the
  # paper's) | t | logsnr | inv_eta, of 2^-k of that variable's range (objectives/imm.py mapped_r; Fig. 11).
  # weighting: full (Eq. 13) | elbo_alpha | elbo | none (Table 4's reductions). kernel: laplace (the
  # paper's) | rbf | energy | squared (matches only the mean: a consistency model at group_size 1,
  # Lemma 1) | pseudo_huber (Lemma 2; c = kernel_c / sqrt(D)), all of u = w~(s, t) ||a - b|| / D but rbf.
  c.imm = ml_collections.ConfigDict(dict(
      group_size=4, eps=0.006, T=0.994, k=12, eta_max=160.0, eta_min=0.0, min_gap=0.0,
      kernel="laplace", kernel_c=0.1, weight_a=1.0, weight_b=4.0, label_dropout=0.0, mapping="eta", weighting="full"))

  # Flow matching (objectives/flow_matching.py): t ~ U(eps, T), also the samplers' range.
  c.flow_matching = ml_collections.ConfigDict(dict(eps=0.0, T=1.0, prediction="velocity", label_dropout=0.0))

  # Moment-matching distillation (objectives/moment_matching.py, spec mm_distill.md) of the teacher in
  # ``teacher.workdir`` (a run with the same model and precond sections; step: None = latest).
  c.moment_matching = ml_collections.ConfigDict(dict(
      variant="alternating", k=8, s_min=0.0, weight="auto", weight_max=1e4, posterior="conditional",
      aux_teacher_reg=True, preconditioner="adam", teacher_cfg_scale=1.0))
  c.teacher = ml_collections.ConfigDict(dict(workdir="", step=ml_collections.config_dict.placeholder(int)))

  # Start a new run from another run's network (fine-tuning; trainer.load_start_params): the EMA
  # parameters of a workdir written by imm_jax.train or imm_jax.convert (a released checkpoint), at
  # ``step`` (None = latest), start the parameters and the EMA; optimizer, step and data order start
  # fresh. Parameters the source lacks (e.g. an added augmentation embedding) keep their fresh
  # initialisation. Not read when --workdir already holds checkpoints: that run resumes.
  c.init = ml_collections.ConfigDict(dict(workdir="", step=ml_collections.config_dict.placeholder(int)))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
      schedule="constant", grad_clip=0.0))
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, warmup=False))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**18))

  # Sample grids during training (and the defaults of imm_jax.sample). sampler: pushforward | restart
  # (IMM), euler | heun (flow ODE), ancestral (moment matching's Alg. 1).
  c.sample = ml_collections.ConfigDict(dict(
      steps=(1, 2, 4), num=64, schedule="default", mid_etas=(), sampler="pushforward", cfg_scale=1.0))
  # Sample quality (energy distance, RBF MMD) at the end of training (and every ``every`` steps, and of
  # the untrained network with ``at_start``): ``samples`` model samples per step count (0: ``num``),
  # generated at most ``batch`` at a time, against ``num`` held-out examples (0: no evaluation). The
  # figure's noise falls with ``samples``; the held-out set is the same for every run and step.
  c.eval = ml_collections.ConfigDict(dict(num=0, samples=0, batch=2048, steps=(1, 2, 4), every=0,
                                          at_start=True))
  return c
