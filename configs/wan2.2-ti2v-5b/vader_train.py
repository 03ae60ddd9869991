# VADER training on Wan2.2-TI2V-5B through diffusers (model.type='wan'): the 1.3B recipe (../wan2.1-t2v-1.3b,
# this file's _base_: LoRA on every attention projection, HPS v2.1 on one decoded frame) at Wan2.2-TI2V-5B's
# published settings: 121 frames of 704x1280 at 24 fps, flow shift 5.0, guidance 5.0 (Wan2.2's ti2v_5B config).
# TI2V: text-to-video, or text and a first frame per prompt (a prompts file gives a first frame for every
# prompt or for none). With a first frame, latent frame 0 is the image's latent at timestep 0 (WanPipeline /
# WanImageToVideoPipeline with expand_timesteps), so decoded frame 0 is its VAE reconstruction, which no LoRA
# moves: the reward scores frame 1 here (the first generated frame either way).
# Run:  vader train configs/wan2.2-ti2v-5b/vader_train.py --prompt-path prompts.txt
# The 5.0B transformer is 9.3 GiB in bf16; the Wan2.2 VAE (z_dim 48) compresses 16x spatially, so 704x1280x121
# is 31 x 44 x 80 latents (27,280 tokens after the 2x2 patch). `vader plan` this config on your card first.
# The final LoRA loads into diffusers with WanPipeline.load_lora_weights("<run>/lora/diffusers") (or into
# WanImageToVideoPipeline's, for first frames).
_base_ = "../wan2.1-t2v-1.3b/vader_train.py"  # everything not set here

image_size = (704, 1280)  # (height, width): the published 720P size (or (1280, 704)); multiples of 32
num_frames = 121  # Wan2.2 TI2V-5B's frame_num (4k + 1)
save_fps = 24  # Wan2.2 TI2V-5B's sample_fps
model = dict(from_pretrained="Wan-AI/Wan2.2-TI2V-5B-Diffusers")
scheduler = dict(
    num_sampling_steps=30,  # flow-matching Euler steps while training (Wan samples 50: vader_inference.py)
    cfg_scale=5.0,  # Wan2.2 ti2v_5B's sample_guide_scale
    shift=5.0,  # Wan2.2 ti2v_5B's sample_shift
)
decode_frame = "1"  # the first generated frame (frame 0 is the given image's reconstruction when there is one)
