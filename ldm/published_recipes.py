"""Each baseline architecture's own published training and sampling recipe, one value per key, each with its source.

The paper we reproduce (arXiv 2411.03177) trains every compared architecture "with its own published recipe"; this
module is where those recipes live, so that a reader can check every number against its origin instead of trusting
a config file. A value whose origin does not state it carries a source starting with "assumed:" and the reason for the
choice. Runs whose config sets `own_recipe: true` take these values as defaults (explicit config values win), and
`ldm recipes` prints the table with its sources.

Repositories were read at these commits: facebookresearch/DiT@ed81ce2, sail-sg/MDT@7d26c21 (MDTv2),
sail-sg/Adan@2c65bea, CompVis/latent-diffusion@a506df5, PixArt-alpha/PixArt-alpha@cac2fd3,
huggingface/diffusers@58eb52c. Paper locators name the table or section; code locators quote the literal text.
"""
from __future__ import annotations

from typing import NamedTuple


class Setting(NamedTuple):
    value: object
    source: str  # where the value is published ("DiT train.py L123: ..."), or "assumed: <why>"

    @property
    def assumed(self) -> bool:
        return self.source.startswith("assumed")


_NOT_RF = "not used by rectified flow"

PUBLISHED_RECIPES: dict[str, dict[str, Setting]] = {
    # LDM-4 class-conditional ImageNet 256 (Rombach et al. 2022, "LDM-4-G", FID 3.60).
    "unet": {
        "objective": Setting("ddpm", "LDM ddpm.py DDPM.__init__: `parameterization=\"eps\"` (epsilon prediction); "
                                     "cin256-v2.yaml target ldm.models.diffusion.ddpm.LatentDiffusion"),
        "beta_schedule": Setting("scaled_linear",
                                 "LDM configs/latent-diffusion/cin256-v2.yaml: `linear_start: 0.0015`, "
                                 "`linear_end: 0.0195`, `timesteps: 1000`; ddpm.py default `beta_schedule=\"linear\"`, "
                                 "which util.make_beta_schedule squares from a linspace of the square roots"),
        "learn_sigma": Setting(False, "LDM ddpm.py: `learn_logvar=False`, comment 'all assuming fixed variance "
                                      "schedules'; UNet out_channels = latent channels (cin256-v2.yaml: 3 and 3)"),
        "training.lr": Setting(1.0e-4, "LDM cin256-v2.yaml `base_learning_rate: 0.0001`; LDM paper Table 15 "
                                       "(conditional LDMs, ImageNet column) learning rate 1.0e-4 at batch 1200. Note: "
                                       "LDM main.py `--scale_lr` (default True) multiplies base_lr by "
                                       "accumulate_grad_batches * ngpu * batch_size; the paper's 1e-4 is the "
                                       "rate used"),
        "training.betas": Setting([0.9, 0.999], "LDM ddpm.py configure_optimizers: `torch.optim.AdamW(params, lr=lr)` "
                                                "passes no betas, so torch's default (0.9, 0.999)"),
        "training.weight_decay": Setting(0.01, "LDM ddpm.py configure_optimizers: `torch.optim.AdamW(params, lr=lr)` "
                                               "passes no weight_decay, so torch AdamW's default 0.01"),
        "training.batch_size": Setting(1200, "LDM paper Table 15 (conditional LDMs, ImageNet class-label column): "
                                             "batch size 1200, 178k iterations; cin256-v2.yaml has no data section"),
        "training.warmup": Setting(0, "LDM cin256-v2.yaml sets no scheduler_config, so ddpm.py "
                                      "`self.use_scheduler = scheduler_config is not None` is False: constant lr"),
        "training.ema": Setting(0.9999, "assumed: the released cin256-v2.yaml (an inference config) sets "
                                        "`use_ema: False`; LDM's training default is ddpm.py `use_ema=True` with "
                                        "ema.py LitEma `decay=0.9999`, taken here"),
        "training.grad_clip": Setting(None, "LDM cin256-v2.yaml and main.py set no gradient_clip_val "
                                            "(PyTorch Lightning default: no clipping)"),
        "sampling.sampler": Setting("ddim", "LDM paper Table 3, LDM-4-G row: 250 DDIM steps, c.f.g. s = 1.5, "
                                            "FID 3.60"),
        "sampling.steps": Setting(250, "LDM paper Table 3, LDM-4-G row: 250 DDIM steps"),
        "sampling.guidance": Setting(1.5, "LDM paper Table 3, LDM-4-G row: classifier-free guidance scale s = 1.5"),
        "sampling.guidance_schedule": Setting("constant", "LDM ddim.py p_sample_ddim: `e_t = e_t_uncond + "
                                                          "unconditional_guidance_scale * (e_t - e_t_uncond)`, "
                                                          "one scale at every step"),
        "sampling.guidance_power": Setting(None, "constant guidance has no power (LDM ddim.py)"),
        "sampling.guidance_channels": Setting(None, "LDM ddim.py guides the whole e_t (all latent channels)"),
        "schedule_shift": Setting("none", "LDM: one fixed beta schedule for every resolution "
                                          "(cin256-v2.yaml linear_start/linear_end)"),
        "label_sampling": Setting("random", "assumed: LDM publishes no class-conditional FID sampling script; ADM's "
                                            "image_sample.py protocol (which LDM's evaluation follows) draws labels "
                                            "with th.randint"),
    },
    # DiT-XL/2 (Peebles & Xie 2023, DiT-XL/2-G FID 2.27 at 256 px, 3.04 at 512 px).
    "dit": {
        "objective": Setting("ddpm", "DiT diffusion/__init__.py create_diffusion: `predict_xstart=False` "
                                     "(epsilon prediction), loss MSE"),
        "beta_schedule": Setting("linear", "DiT train.py: `create_diffusion(timestep_respacing=\"\")  # default: "
                                           "1000 steps, linear noise schedule`; __init__.py "
                                           "`noise_schedule=\"linear\"`"),
        "learn_sigma": Setting(True, "DiT diffusion/__init__.py create_diffusion: `learn_sigma=True` "
                                     "(ModelVarType.LEARNED_RANGE)"),
        "training.lr": Setting(1.0e-4, "DiT train.py: `torch.optim.AdamW(model.parameters(), lr=1e-4, "
                                       "weight_decay=0)`; DiT paper §4: constant lr 1e-4, no scaling with batch"),
        "training.betas": Setting([0.9, 0.999], "DiT train.py AdamW call passes no betas, so torch's default "
                                                "(0.9, 0.999)"),
        "training.weight_decay": Setting(0.0, "DiT train.py: `torch.optim.AdamW(..., lr=1e-4, weight_decay=0)`"),
        "training.batch_size": Setting(256, "DiT train.py: `--global-batch-size` default 256; DiT paper §4: "
                                            "batch size 256"),
        "training.warmup": Setting(0, "DiT train.py has no lr scheduler; DiT paper §4: learning rate warmup "
                                      "was not found necessary"),
        "training.ema": Setting(0.9999, "DiT train.py: `def update_ema(ema_model, model, decay=0.9999)`, called as "
                                        "`update_ema(ema, model.module)` every step"),
        "training.grad_clip": Setting(None, "DiT train.py: no gradient clipping in the training loop"),
        "sampling.sampler": Setting("ddpm", "DiT sample_ddp.py: `diffusion.p_sample_loop(...)` (ancestral DDPM on "
                                            "IDDPM respacing); README: FID 'computed with 250 DDPM sampling steps'"),
        "sampling.steps": Setting(250, "DiT sample_ddp.py: `--num-sampling-steps` default 250"),
        "sampling.guidance": Setting(1.5, "DiT sample_ddp.py: `--cfg-scale` default 1.5; DiT paper Table 4: "
                                          "DiT-XL/2-G (cfg=1.50) FID 2.27"),
        "sampling.guidance_schedule": Setting("constant", "DiT models.py forward_with_cfg: `half_eps = uncond_eps + "
                                                          "cfg_scale * (cond_eps - uncond_eps)` at every step"),
        "sampling.guidance_power": Setting(None, "constant guidance has no power (DiT models.py forward_with_cfg)"),
        "sampling.guidance_channels": Setting(3, "DiT models.py forward_with_cfg: `eps, rest = model_out[:, :3], "
                                                 "model_out[:, 3:]` ('we apply classifier-free guidance on only "
                                                 "three channels by default')"),
        "schedule_shift": Setting("none", "DiT: the same linear schedule at 256 and 512 px "
                                          "(train.py create_diffusion defaults)"),
        "label_sampling": Setting("random", "DiT sample_ddp.py: `y = torch.randint(0, args.num_classes, (n,), "
                                            "device=device)`"),
    },
    # MDTv2-XL/2 (Gao et al., arXiv 2303.14389 v2, FID 1.58 at 256 px).
    "mdt": {
        "objective": Setting("ddpm", "MDT masked_diffusion/__init__.py diffusion_defaults: `predict_xstart=False` "
                                     "(epsilon prediction)"),
        "beta_schedule": Setting("linear", "MDT masked_diffusion/__init__.py diffusion_defaults: "
                                           "`noise_schedule=\"linear\"`, `diffusion_steps=1000`"),
        "learn_sigma": Setting(True, "MDT masked_diffusion/__init__.py diffusion_defaults: `learn_sigma=True`"),
        "training.lr": Setting(3.0e-4, "MDT scripts/image_train.py create_argparser: `lr=3e-4`; README and "
                                       "run_ddp_master.sh pass no --lr for MDTv2_XL_2 (run.sh uses 5e-4 for "
                                       "MDTv2_S_2); no batch scaling. This rate was tuned for Adan, not AdamW"),
        "training.betas": Setting([0.98, 0.99], "assumed: MDTv2 trains with Adan (train_util.py "
                                                "`opt_type='adan'`), whose defaults are betas=(0.98, 0.92, 0.99) "
                                                "(sail-sg/Adan adan.py); an AdamW run maps Adan's first-moment "
                                                "beta1=0.98 and second-moment beta3=0.99 onto (b1, b2)"),
        "training.weight_decay": Setting(0.0, "MDT scripts/image_train.py create_argparser: `weight_decay=0.0`"),
        "training.batch_size": Setting(256, "MDT README MDTv2_XL_2: `--batch_size 4` on NUM_NODE=8 x "
                                            "GPU_PRE_NODE=8; run_ddp_master.sh: `--batch_size 8` on 4 x 8 GPUs: "
                                            "both 256 global"),
        "training.warmup": Setting(0, "MDT train_util.py TrainLoop has no warmup; image_train.py "
                                      "`lr_anneal_steps=0` keeps the lr constant"),
        "training.ema": Setting(0.9999, "MDT scripts/image_train.py create_argparser: `ema_rate=\"0.9999\"`"),
        "training.grad_clip": Setting(1.0, "MDT train_util.py: `Adan(..., max_grad_norm=1, fused=True)` "
                                           "(global grad-norm clipping inside the optimizer)"),
        "sampling.sampler": Setting("ddpm", "MDT scripts/image_sample.py: `use_ddim=False`, so "
                                            "`diffusion.p_sample_loop` (ancestral DDPM on IDDPM respacing)"),
        "sampling.steps": Setting(250, "MDT README / run_sample.sh: `--num_sampling_steps 250`"),
        "sampling.guidance": Setting(3.8, "MDT scripts/image_sample.py create_argparser: `cfg_scale=3.8`; the README "
                                          "FID command passes `--cfg_cond True` and no --cfg_scale"),
        "sampling.guidance_schedule": Setting("power_cosine", "MDT masked_diffusion/models.py forward_with_cfg: "
                                                              "`scale_step = (1-torch.cos(((1-t/diffusion_steps)"
                                                              "**scale_pow)*math.pi))*1/2`, `real_cfg_scale = "
                                                              "(cfg_scale-1)*scale_step + 1`"),
        "sampling.guidance_power": Setting(4.0, "MDT scripts/image_sample.py: `--scale_pow` default 4; "
                                                "models.py forward_with_cfg `scale_pow=4.0`"),
        "sampling.guidance_channels": Setting(3, "MDT masked_diffusion/models.py forward_with_cfg: `eps, rest = "
                                                 "model_out[:, :3], model_out[:, 3:]`"),
        "schedule_shift": Setting("none", "MDT: one linear schedule (diffusion_defaults); released models are "
                                          "256 px only (infer_mdt.py asserts image_size in [256])"),
        "label_sampling": Setting("random", "MDT scripts/image_sample.py: `classes = th.randint(low=0, "
                                            "high=NUM_CLASSES, size=(args.batch_size,), ...)`"),
    },
    # PixArt-alpha XL/2 (Chen et al., arXiv 2310.00426); text-to-image, so the sampler is the default inference one.
    "pixart": {
        "objective": Setting("ddpm", "PixArt diffusion/iddpm.py IDDPM: `predict_xstart=False` (epsilon prediction), "
                                     "train_scripts/train.py `IDDPM(str(config.train_sampling_steps), ...)`"),
        "beta_schedule": Setting("linear", "PixArt diffusion/iddpm.py IDDPM: `noise_schedule=\"linear\"`; "
                                           "PixArt_xl2_internal.py `train_sampling_steps = 1000`"),
        "learn_sigma": Setting(True, "PixArt train_scripts/train.py: `learn_sigma = getattr(config, 'learn_sigma', "
                                     "True) and pred_sigma` (no config overrides it)"),
        "training.lr": Setting(2.0e-5, "PixArt configs/pixart_config/PixArt_xl2_img256_internal.py: "
                                       "`optimizer = dict(type='AdamW', lr=2e-5, weight_decay=3e-2, eps=1e-10)`; "
                                       "paper: constant 2e-5. Note: base config `auto_lr = dict(rule='sqrt')` makes "
                                       "train.py scale it by sqrt(global_batch / 256) (optimizer.py auto_scale_lr)"),
        "training.betas": Setting([0.9, 0.999], "PixArt img256 config optimizer dict passes no betas; mmcv builds "
                                                "torch.optim.AdamW, so torch's default (0.9, 0.999)"),
        "training.weight_decay": Setting(0.03, "PixArt PixArt_xl2_img256_internal.py: `weight_decay=3e-2`; "
                                               "paper: AdamW with weight decay 0.03"),
        "training.batch_size": Setting(11264, "assumed: the paper states no global batch; img256 config "
                                              "`train_batch_size = 176` is per GPU, times the 64 V100 GPUs the "
                                              "paper reports training on"),
        "training.warmup": Setting(1000, "PixArt PixArt_xl2_img256_internal.py: "
                                         "`lr_schedule_args = dict(num_warmup_steps=1000)` (constant after warmup)"),
        "training.ema": Setting(0.9999, "PixArt configs/PixArt_xl2_internal.py: `ema_rate = 0.9999`"),
        "training.grad_clip": Setting(0.01, "PixArt PixArt_xl2_img256_internal.py: `gradient_clip = 0.01` "
                                            "(overrides the base 1.0; train.py accelerator.clip_grad_norm_)"),
        "sampling.sampler": Setting("dpm", "PixArt scripts/inference.py: `--sampling_algo` default 'dpm-solver'; "
                                           "diffusion/dpm_solver.py DPMS: `algorithm_type=\"dpmsolver++\"`, "
                                           "order 2, multistep"),
        "sampling.steps": Setting(20, "PixArt scripts/inference.py: `sample_steps_dict = {'iddpm': 100, "
                                      "'dpm-solver': 20, 'sa-solver': 25}`; diffusers PixArtAlphaPipeline "
                                      "`num_inference_steps: int = 20`"),
        "sampling.guidance": Setting(4.5, "PixArt scripts/inference.py: `--cfg_scale` default 4.5; diffusers "
                                          "PixArtAlphaPipeline `guidance_scale: float = 4.5`"),
        "sampling.guidance_schedule": Setting("constant", "PixArt dpm_solver.py DPMS: model_wrapper("
                                                          "guidance_type='classifier-free', guidance_scale=cfg_scale), "
                                                          "one scale at every step"),
        "sampling.guidance_power": Setting(None, "constant guidance has no power (PixArt DPMS)"),
        "sampling.guidance_channels": Setting(None, "PixArt default DPM-Solver path guides the whole eps that "
                                                    "nets/PixArt.py forward_with_dpmsolver returns "
                                                    "(`model_out.chunk(2, dim=1)[0]`, all 4 channels); only the "
                                                    "iddpm path's forward_with_cfg guides `model_out[:, :3]`"),
        "schedule_shift": Setting("none", "PixArt: IDDPM/DPMS use the same linear betas at 256, 512 and 1024 px"),
        "label_sampling": Setting("captions", "PixArt is text-to-image (T5 captions, "
                                              "PixArt_xl2_internal.py `model_max_length = 120`)"),
    },
    # mmDiT: SD3's multimodal DiT (Esser et al., arXiv 2403.03206); text-to-image, default inference sampler.
    "mmdit": {
        "objective": Setting("rectified_flow", "SD3 paper §5.1: rectified flow with logit-normal timestep sampling "
                                               "(rf/lognorm(0.00, 1.00)) chosen as the best formulation"),
        "beta_schedule": Setting(None, _NOT_RF),
        "learn_sigma": Setting(False, "SD3 paper §2: the network predicts the velocity only; diffusers "
                                      "SD3Transformer2DModel `out_channels = ... in_channels` (no variance head)"),
        "training.lr": Setting(1.0e-4, "SD3 paper, appendix on experiment details (ImageNet/CC12M study of §5.1): "
                                       "AdamW, learning rate 1e-4 with 1000 linear warmup steps"),
        "training.betas": Setting([0.9, 0.999], "assumed: the SD3 paper names AdamW without betas; Stability's "
                                                "generative-models sgm DiffusionEngine default optimizer_config "
                                                "{\"target\": \"torch.optim.AdamW\"} keeps torch's (0.9, 0.999)"),
        "training.weight_decay": Setting(0.01, "assumed: the SD3 paper names AdamW without weight decay; torch "
                                               "AdamW's default 0.01, as sgm's default optimizer_config leaves it"),
        "training.batch_size": Setting(1024, "SD3 paper, appendix on experiment details (§5.1 study): "
                                             "batch size 1024"),
        "training.warmup": Setting(1000, "SD3 paper, appendix on experiment details: 1000 linear warmup steps"),
        "training.ema": Setting(0.9999, "SD3 paper, appendix on experiment details: EMA decay 0.99 applied every "
                                        "100 training batches, i.e. about 0.99 ** (1 / 100) = 0.9999 per step"),
        "training.grad_clip": Setting(None, "assumed: the SD3 paper states no gradient clipping (it stabilises "
                                            "training with QK-normalisation instead)"),
        "sampling.sampler": Setting("euler", "diffusers StableDiffusion3Pipeline: scheduler "
                                             "FlowMatchEulerDiscreteScheduler (Euler on the flow ODE)"),
        "sampling.steps": Setting(28, "diffusers StableDiffusion3Pipeline.__call__: `num_inference_steps: int = 28`"),
        "sampling.guidance": Setting(7.0, "diffusers StableDiffusion3Pipeline.__call__: "
                                          "`guidance_scale: float = 7.0`"),
        "sampling.guidance_schedule": Setting("constant", "diffusers StableDiffusion3Pipeline: `noise_pred = "
                                                          "noise_pred_uncond + self.guidance_scale * "
                                                          "(noise_pred_text - noise_pred_uncond)` at every step"),
        "sampling.guidance_power": Setting(None, "constant guidance has no power (StableDiffusion3Pipeline)"),
        "sampling.guidance_channels": Setting(None, "diffusers StableDiffusion3Pipeline guides the whole "
                                                    "noise_pred (all latent channels)"),
        "schedule_shift": Setting(3.0, "SD3 paper §5.3.2 (resolution-dependent shifting of timestep schedules): "
                                       "shift 3.0 at 1024 px; stabilityai/stable-diffusion-3-medium-diffusers "
                                       "scheduler/scheduler_config.json `\"shift\": 3.0`"),
        "label_sampling": Setting("captions", "SD3 is text-to-image (CLIP-L, CLIP-G and T5 caption encoders)"),
    },
    # The paper we reproduce (Berrada Ifriqi et al., arXiv 2411.03177); no official code, see design/PAPER.md.
    "improved": {
        "objective": Setting("rectified_flow", "assumed: the paper does not publish its objective; rectified flow "
                                               "with logit-normal(0, 1) timesteps, as its mmDiT baseline "
                                               "(PAPER.md §4)"),
        "beta_schedule": Setting(None, _NOT_RF),
        "learn_sigma": Setting(False, "assumed: a rectified-flow velocity model has no variance head"),
        "training.lr": Setting(1.0e-4, "assumed: not public (PAPER.md §5); 1e-4 is the rate of DiT and SD3"),
        "training.betas": Setting([0.9, 0.95], "arXiv 2411.03177 appendix: AdamW with betas (0.9, 0.95), as cited "
                                               "by third-party code (PAPER.md §5)"),
        "training.weight_decay": Setting(0.0, "assumed: not public (PAPER.md §5); 0 as in DiT"),
        "training.batch_size": Setting(2048, "assumed: not public; the global batch of config/paper.yaml"),
        "training.warmup": Setting(1000, "assumed: not public (PAPER.md §5); 1000 steps as SD3"),
        "training.ema": Setting(0.9999, "assumed: not public (PAPER.md §5); 0.9999 as DiT, MDT and PixArt"),
        "training.grad_clip": Setting(1.0, "assumed: not public (PAPER.md §5); norm 1.0 guards bf16 training"),
        "sampling.sampler": Setting("euler", "assumed: Euler on the flow ODE, the sampler of the assumed "
                                             "rectified-flow objective"),
        "sampling.steps": Setting(250, "assumed: not public; the 250-step count of the DiT/MDT FID protocol, so "
                                       "the comparison is at equal steps"),
        "sampling.guidance": Setting(1.5, "assumed: not public; DiT's headline scale (the paper guides semantic and "
                                          "control conditions with separate scales; this is the semantic one)"),
        "sampling.guidance_schedule": Setting("constant", "assumed: the paper describes no guidance schedule"),
        "sampling.guidance_power": Setting(None, "assumed: constant guidance has no power"),
        "sampling.guidance_channels": Setting(None, "assumed: standard guidance of the whole prediction; the "
                                                    "3-channel quirk is DiT code, not a described method"),
        "schedule_shift": Setting("auto", "arXiv 2411.03177 (PAPER.md §3): the noise schedule is shifted with "
                                          "resolution when transferring 256 -> 512 px; the exact form is not "
                                          "public, the SD3 form a = sqrt(N'/N) is the project's assumption"),
        "label_sampling": Setting("random", "assumed: not public; uniform random labels as the DiT/MDT FID scripts "
                                            "(CC12M runs sample captions)"),
    },
}


def own_recipe_defaults(arch: str) -> dict:
    """The architecture's published recipe as recipe config keys (what `own_recipe: true` fills in): `training.*`
    and `sampling.*` nest, `learn_sigma` goes to `options`, the sampler to the recipe's `sampler`, the label
    policy to `sampling.labels`; a value that does not apply (DDPM betas of a flow model, the label policy of
    a text model) is left out."""
    out: dict = {}
    for key, setting in PUBLISHED_RECIPES[arch].items():
        value = setting.value
        if key == "beta_schedule" and value is None or key == "label_sampling" and value == "captions":
            continue
        if key == "learn_sigma":
            out.setdefault("options", {})["learn_sigma"] = value
        elif key == "sampling.sampler":
            out["sampler"] = value
        elif key == "label_sampling":
            out.setdefault("sampling", {})["labels"] = value
        elif "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def recipes_table(archs: list[str] | None = None) -> list[dict]:
    """Rows (arch, key, value, source, assumed) for `ldm recipes`."""
    return [{"arch": arch, "key": key, "value": s.value, "source": s.source, "assumed": s.assumed}
            for arch in (archs or list(PUBLISHED_RECIPES)) for key, s in PUBLISHED_RECIPES[arch].items()]
