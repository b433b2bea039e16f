#!/bin/bash
# The Pile recipe (0.36B, L18-D1024, ctx 4096), step 2 of 2: 80 mini-epochs streamed from the jsonl.zst shards,
# 7.9 B tokens (about 20 per parameter), resuming from the newest checkpoint in PROJ_DIR.
set -e
cd "$(dirname "$0")"

DATA_ROOT="/mnt/TrainingData/Training/EleutherAI_ThePile_v1/pile/train"   # folder of 00.jsonl.zst ... 29.jsonl.zst
MODEL_TYPE="x070"
N_LAYER="18"
N_EMBD="1024"
CTX_LEN="4096"
PROJ_DIR="out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}"

M_BSZ="24"          # micro batch per GPU
GRAD_CP=3           # 3: recompute each block's elementwise math and wkv7 in backward (45 GB on one GPU); 1: recompute
                    # it whole (17 GB, 6-7% slower); 2: keep the wkv7 outputs too (6% faster than 3, 83 GB: an H200).
                    # Same numbers with each. README "Speed"
N_NODE=1
GPU_PER_NODE=1
EPOCH_COUNT=80
TOKEN_BUDGET=$((CTX_LEN * 24 * 1000 * EPOCH_COUNT))   # the recipe's 7.9 B tokens, set for one GPU x 24
# More GPUs train on more tokens per step; keep the budget by taking fewer steps per mini-epoch.
REAL_BSZ=$((M_BSZ * N_NODE * GPU_PER_NODE))
EPOCH_STEPS=$((TOKEN_BUDGET / (CTX_LEN * REAL_BSZ * EPOCH_COUNT)))
if [ "$REAL_BSZ" != 24 ]; then
    echo "real batch $REAL_BSZ (not 24): keeping the $TOKEN_BUDGET-token budget with $EPOCH_STEPS steps per mini-epoch instead of 1000"
fi

[ -f rwkv_vocab_v20230424.txt ] || { echo "error: rwkv_vocab_v20230424.txt is missing from $(pwd); restore it with git checkout rwkv_vocab_v20230424.txt"; exit 1; }
ls "$DATA_ROOT"/*.jsonl.zst "$DATA_ROOT"/*.jsonl >/dev/null 2>&1 || { echo "error: no .jsonl.zst or .jsonl shards in DATA_ROOT=$DATA_ROOT; edit DATA_ROOT at the top of $0"; exit 1; }

python train.py --load_model "0" --wandb "" --proj_dir "$PROJ_DIR" --my_testing "$MODEL_TYPE" \
 --ctx_len "$CTX_LEN" --train_stage 3 --epoch_count "$EPOCH_COUNT" --epoch_steps "$EPOCH_STEPS" --epoch_begin 0 \
 --data_file "$DATA_ROOT" --data_type "jsonl" --my_exit_tokens "$TOKEN_BUDGET" \
 --num_nodes "$N_NODE" --micro_bsz "$M_BSZ" --n_layer "$N_LAYER" --n_embd "$N_EMBD" \
 --lr_init 6e-4 --lr_final 2e-5 --warmup_steps 1500 --beta1 0.9 --beta2 0.997 --adam_eps 1e-18 \
 --vocab_size 65536 --weight_decay 0.1 --epoch_save 5 --head_size 64 \
 --accelerator gpu --devices "$GPU_PER_NODE" --precision bf16 --strategy deepspeed_stage_2 --grad_cp "$GRAD_CP" \
 --enable_progress_bar True --ds_bucket_mb 200
