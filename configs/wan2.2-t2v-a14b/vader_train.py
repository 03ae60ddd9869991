# VADER training on Wan2.2-T2V-A14B through diffusers (model.type='wan'): the 1.3B recipe (../wan2.1-t2v-1.3b,
# this file's _base_) on Wan2.2's two experts of 14B each at Wan's published settings: 81 frames of 480x832.
# Sampling as WanPipeline: steps with t >= 875 (boundary_ratio 0.875, from the checkpoint's model_index.json)
# run the high-noise expert `transformer` with cfg_scale, later steps the low-noise expert `transformer_2`
# with cfg_scale_2. The LoRA trains on the low-noise expert (the last steps, where backprop_mode='last' puts
# the gradient); the high-noise expert stays frozen and runs without gradients (`vader config` shows the split).
# Run:  vader train configs/wan2.2-t2v-a14b/vader_train.py --prompt-path prompts.txt
# Both experts are loaded (2 x 14.3B parameters, 53 GiB in bf16): `vader plan` this config first; on several
# GPUs, sharding='fsdp' splits both experts' frozen weights over them (left to you: 'none' here).
# The final LoRA loads into diffusers with
#     pipe.load_lora_weights("<run>/lora/diffusers", load_into_transformer_2=True)
_base_ = "../wan2.1-t2v-1.3b/vader_train.py"  # everything not set here

num_frames = 81  # Wan's default (4k + 1); fewer frames (33, 49) cost less memory and time
model = dict(from_pretrained="Wan-AI/Wan2.2-T2V-A14B-Diffusers")
scheduler = dict(
    num_sampling_steps=30,  # while training: 19 high-noise + 11 low-noise steps (Wan samples 40: vader_inference.py)
    cfg_scale=4.0,  # the high-noise expert's guidance (Wan2.2 t2v-A14B sample_guide_scale (3.0, 4.0): low, high)
    cfg_scale_2=3.0,  # the low-noise expert's
    shift=12.0,  # Wan2.2 t2v-A14B's sample_shift
)
