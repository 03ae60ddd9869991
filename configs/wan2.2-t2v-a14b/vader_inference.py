# Inference with Wan2.2-T2V-A14B through diffusers (model.type='wan'), with or without a trained LoRA (it goes on
# the low-noise expert transformer_2, as training put it):
#     vader infer configs/wan2.2-t2v-a14b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
_base_ = "vader_train.py"  # model, sizes, guidance, shift, dtype, seed of the training config; below, what differs

scheduler = dict(num_sampling_steps=40, solver="published")  # Wan2.2 t2v-A14B's sample_steps, with its UniPC
# (`vader config` shows how many steps each expert takes)
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes frame 0 for the reward)
