# VADER training on CogVideoX-5B through diffusers (model.type='cogvideox'): the 2B recipe (../cogvideox-2b,
# this file's _base_: a LoRA on the joint text-video attention, HPS v2.1 on decoded frame 0 of a 49-frame
# 480x720 video) on the 5B transformer (42 blocks, rotary embeddings), sampled with dynamic guidance as THUDM
# samples the 5B.
# Run:  vader train configs/cogvideox-5b/vader_train.py --prompt-path prompts.txt
# `vader plan` puts a step at 37 GiB with decode_frame '0' and 90 GiB with '-1' (random frame, worst draw).
# The final LoRA loads into diffusers with CogVideoXPipeline.load_lora_weights("<run>/lora/diffusers").
_base_ = "../cogvideox-2b/vader_train.py"  # everything not set here

model = dict(from_pretrained="THUDM/CogVideoX-5b")  # a hub id or a local folder in the diffusers layout
scheduler = dict(
    use_dynamic_cfg=True,  # the pipeline's cosine ramp of the guidance over the steps, as THUDM samples the 5B
    # 'differentiable': every step is the DDIM step the gradients go through (validation too); 'published':
    # steps without gradients take CogVideoXDPMScheduler's stochastic step, as THUDM samples the 5B
    # (vader_inference.py uses it)
    solver="differentiable",
)
