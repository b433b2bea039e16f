#!/bin/bash
# MiniPile recipe, step 1 of 2 (docs/RECIPE.md section 9): check the data and write the initial weights.
# Edit N_LAYER / N_EMBD for other sizes, DATA for data elsewhere (keep them the same in demo-training-run.sh).
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
DATA_URL="https://huggingface.co/datasets/BlinkDL/minipile-tokenized/resolve/main/rwkv_vocab_v20230424"
PROJ_DIR="out/L${N_LAYER}-D${N_EMBD}-${MODEL_TYPE}"

if [ ! -f "$DATA.bin" ] || [ ! -f "$DATA.idx" ]; then
    echo "MiniPile is missing ($DATA.bin / $DATA.idx). It is the public tokenized MiniPile:"
    echo "  huggingface.co/datasets/BlinkDL/minipile-tokenized, files rwkv_vocab_v20230424/minipile.bin and .idx"
    echo "Downloading it into $(dirname "$DATA")/ (about 3 GB; rerun this script to resume an interrupted download)..."
    python tools/download.py "$DATA_URL/minipile.idx" "$DATA.idx"
    python tools/download.py "$DATA_URL/minipile.bin" "$DATA.bin"
fi

python train.py --wandb "" --proj_dir "$PROJ_DIR" \
 --data_file "$DATA" --data_type "binidx" --vocab_size 65536 --my_testing "$MODEL_TYPE" \
 --ctx_len "$CTX_LEN" --train_stage 1 --epoch_count 1 --epoch_begin 0 \
 --epoch_save 1 --weight_decay 0 --head_size 64 \
 --num_nodes 1 --micro_bsz 1 --n_layer "$N_LAYER" --n_embd "$N_EMBD" \
 --my_exit_tokens "$MY_EXIT_TOKENS" --magic_prime "$MAGIC_PRIME" \
 --lr_init 1e-5 --lr_final 1e-5 --warmup_steps 10 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 \
 --accelerator cpu --devices 1 --precision bf16 --strategy deepspeed_stage_2 --grad_cp 1
