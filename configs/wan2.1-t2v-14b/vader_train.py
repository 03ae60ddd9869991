# VADER training on Wan2.1-T2V-14B through diffusers (model.type='wan'): the 1.3B recipe (../wan2.1-t2v-1.3b,
# this file's _base_: LoRA on every attention projection, HPS v2.1 on decoded frame 0) at Wan's published
# 14B settings: 81 frames of 480x832.
# Run:  vader train configs/wan2.1-t2v-14b/vader_train.py --prompt-path prompts.txt
# The transformer alone is 14.3B parameters (26.6 GiB in bf16): `vader plan` this config on your cards first;
# on several GPUs, sharding='fsdp' splits the frozen weights over them (left to you: 'none' here).
# The final LoRA loads into diffusers with WanPipeline.load_lora_weights("<run>/lora/diffusers").
_base_ = "../wan2.1-t2v-1.3b/vader_train.py"  # everything not set here

num_frames = 81  # Wan's default (4k + 1); fewer frames (33, 49) cost less memory and time
model = dict(from_pretrained="Wan-AI/Wan2.1-T2V-14B-Diffusers")
scheduler = dict(
    num_sampling_steps=30,  # flow-matching Euler steps while training (Wan samples 50: vader_inference.py)
    cfg_scale=5.0,  # Wan2.1-T2V-14B's sample_guide_scale
    shift=3.0,  # 480p (diffusers' Wan docs: 3.0 for 480p, 5.0 for 720p)
)
