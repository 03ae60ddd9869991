# The quick start: align the toy world's pretrained base model (shipped in the package, trained on CPU
# by tools/toyworld/train_base.py) to the toy_alignment reward — a small video classifier's
# log-probability of the shape, colour, size, motion and background the caption names — on the 48
# held-out captions the base model never saw. Everything is offline; a 2-core CPU is enough:
#     vader train configs/toy/vader_train.py
# The run folder shows the change: before_after.png (base vs LoRA, same prompts and seeds),
# reward_curve.png, samples/, base_val_reward / val_reward in metrics.jsonl, and report.html with the
# independent judge's accuracy per attribute, base model vs LoRA (gold_reward below).
_base_ = "vader_inference.py"  # the world's model, sizes, sampler and held-out prompts (next to this file)

is_vader_training = True
train_batch_size = 2
num_val_runs = 3  # 24 validation videos: the base-vs-LoRA comparison needs more than a few
lr = 6e-4  # higher rates raise the reward faster but start to fool the classifier (see README)
reward_fn = "toy_alignment"
# scored on the validation videos, never trained on: the independent judge's share of the caption's
# attributes it reads back (another classifier than the reward's); the report shows each attribute,
# base model vs LoRA
gold_reward = "toy_judge"
gradient_accumulation_steps = 1
lora_rank = 8
lora_alpha = 8.0
validation_steps = 0  # validate (and compare with the base model) at the end only
checkpointing_steps = 40
max_train_steps = 120
num_train_epochs = 100
backprop_mode = 3  # DRaFT-K: the last 3 of 12 steps get gradients (the original default is "last")
decode_frame = "all"  # the whole clip, as validation scores it (the classifier reads motion)
is_sample_preview = True
grad_checkpoint = False
