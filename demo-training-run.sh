#!/bin/bash
# MiniPile recipe, step 2 of 2 (docs/RECIPE.md section 9): train L12-D768 for 1.5 B tokens, resuming from the newest
# checkpoint in PROJ_DIR. Expected train_log.txt losses are in README.md. N_LAYER, N_EMBD, CTX_LEN, DATA, MY_EXIT_TOKENS
# and MAGIC_PRIME are those of demo-training-prepare.sh.
set -e
cd "$(dirname "$0")"

MODEL_TYPE="x070"
N_LAYER="12"
N_EMBD="768"
CTX_LEN="512"
DATA="data/minipile"                       # data/minipile.bin + data/minipile.idx (rwkv_vocab_v20230424 tokens)
# MiniPile's 1,498,226,207 tokens at ctx 512; `python tools/magic_prime.py data/minipile --ctx_len 512` prints both
MY_EXIT_TOKENS="1498226207"
MAGIC_PRIME="2926181"
PROJ_DIR="out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}"

M_BSZ="16"          # micro batch per GPU; real batch = M_BSZ x GPU_PER_NODE x N_NODE must divide 40320
LR_INIT="6e-4"
LR_FINAL="6e-5"
GRAD_CP=1           # 1: less VRAM, slower; 0: more VRAM, faster; 2: recompute only the elementwise math
                    # (same numbers as 1, ~11% faster, more VRAM: README "Speed"); 3: that and the wkv7 forward
EPOCH_SAVE=10       # save rwkv-<n>.pth every EPOCH_SAVE mini-epochs (40320 samples each)
N_NODE=1
GPU_PER_NODE=1
DS_BUCKET_MB=2      # 2 for consumer GPUs, 200 for A100 / H100 (affects speed and VRAM)

python train.py --load_model "0" --wandb "" --proj_dir "$PROJ_DIR" --my_testing "$MODEL_TYPE" \
 --ctx_len "$CTX_LEN" --train_stage 3 --epoch_count 999999 --epoch_begin 0 \
 --data_file "$DATA" --my_exit_tokens "$MY_EXIT_TOKENS" --magic_prime "$MAGIC_PRIME" \
 --num_nodes "$N_NODE" --micro_bsz "$M_BSZ" --n_layer "$N_LAYER" --n_embd "$N_EMBD" \
 --lr_init "$LR_INIT" --lr_final "$LR_FINAL" --warmup_steps 10 --beta1 0.9 --beta2 0.99 --adam_eps 1e-18 \
 --data_type "binidx" --vocab_size 65536 --weight_decay 0.001 --epoch_save "$EPOCH_SAVE" --head_size 64 \
 --accelerator gpu --devices "$GPU_PER_NODE" --precision bf16 --strategy deepspeed_stage_2 --grad_cp "$GRAD_CP" \
 --enable_progress_bar True --ds_bucket_mb "$DS_BUCKET_MB"
