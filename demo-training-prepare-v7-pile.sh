#!/bin/bash
# The Pile recipe (0.36B, L18-D1024, ctx 4096), step 1 of 2: check the vocab and the shards, write the init.
set -e
cd "$(dirname "$0")"

DATA_ROOT="/mnt/TrainingData/Training/EleutherAI_ThePile_v1/pile/train"   # folder of 00.jsonl.zst ... 29.jsonl.zst
MODEL_TYPE="x070"
N_LAYER="18"
N_EMBD="1024"
CTX_LEN="4096"
PROJ_DIR="out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}"

[ -f rwkv_vocab_v20230424.txt ] || { echo "error: rwkv_vocab_v20230424.txt is missing from $(pwd); restore it with git checkout rwkv_vocab_v20230424.txt"; exit 1; }
ls "$DATA_ROOT"/*.jsonl.zst "$DATA_ROOT"/*.jsonl >/dev/null 2>&1 || { echo "error: no .jsonl.zst or .jsonl shards in DATA_ROOT=$DATA_ROOT; edit DATA_ROOT at the top of $0"; exit 1; }

python train.py --wandb "" --proj_dir "$PROJ_DIR" \
 --data_file "$DATA_ROOT" --data_type "jsonl" --vocab_size 65536 --my_testing "$MODEL_TYPE" \
 --ctx_len "$CTX_LEN" --train_stage 1 --epoch_count 1 --epoch_begin 0 \
 --epoch_save 1 --weight_decay 0 --head_size 64 \
 --num_nodes 1 --micro_bsz 1 --n_layer "$N_LAYER" --n_embd "$N_EMBD" \
 --lr_init 1e-5 --lr_final 1e-5 --warmup_steps 10 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 \
 --accelerator cpu --devices 1 --precision bf16 --strategy deepspeed_stage_2 --grad_cp 1
