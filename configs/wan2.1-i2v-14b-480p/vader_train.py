# VADER training on Wan2.1-I2V-14B-480P through diffusers (model.type='wan'): image-to-video, every prompt with
# its first frame (the prompts file gives one per prompt; a prompt without one is refused). The 14B recipe
# (../wan2.1-t2v-14b, this file's _base_) at Wan2.1's published I2V settings: 81 frames of 480x832 at 16 fps,
# flow shift 3.0 (480P), guidance 5.0. As WanImageToVideoPipeline: the first frame's CLIP ViT-H/14 tokens go
# through the image cross-attention, and its VAE latents (with black frames after it) and a mask are 20 extra
# input channels. The LoRA trains to_q/to_k/to_v/to_out.0 and the image cross-attention's add_k_proj/add_v_proj.
# Decoded frame 0 is generated (it reconstructs the given frame, so it barely moves): the reward scores frame 1.
# Run:  vader train configs/wan2.1-i2v-14b-480p/vader_train.py --prompt-path prompts.txt
# The transformer is 16.4B parameters (30.6 GiB in bf16); the CLIP image encoder (0.63B, fp32) is loaded before
# it and released once the first frames are encoded. `vader plan` this config on your cards first; on several
# GPUs, sharding='fsdp' splits the frozen weights over them (left to you: 'none' here).
# The final LoRA loads into diffusers with WanImageToVideoPipeline.load_lora_weights("<run>/lora/diffusers").
_base_ = "../wan2.1-t2v-14b/vader_train.py"  # everything not set here

model = dict(from_pretrained="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers")  # 720P: ...-720P-Diffusers, (720, 1280), shift 5.0
text_encoder = dict(model_max_length=512)  # diffusers' Wan I2V attention needs the full 512 text tokens
scheduler = dict(
    num_sampling_steps=30,  # flow-matching Euler steps while training (Wan samples I2V with 40: vader_inference.py)
    cfg_scale=5.0,  # Wan2.1 i2v-14B's sample_guide_scale
    shift=3.0,  # Wan2.1's generate.py for i2v at 832*480 (5.0 at 720P)
)
decode_frame = "1"  # the first frame after the given one's reconstruction
