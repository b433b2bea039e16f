"""tools/export_hf.py: the exported Hugging Face folder, loaded by fla's RWKV7ForCausalLM, gives the logits of the
`rwkv` pip package and of our model; its tokenizer gives our ids; lm-evaluation-harness on the folder scores LAMBADA
as tools/eval.py --lambada does. Needs requirements-export.txt (skipped without it).

fla's kernels are Triton only: the model checks run in a subprocess under Triton's interpreter
(tests/fla_on_cpu.py says what it patches). Tolerance of the logit checks, fp32 on both sides: the runtimes sum in
other orders (fla's recurrent kernel and fused LayerNorm/GroupNorm against PyTorch's loops and products), each
fp32 operation rounding at 6e-8 relative; through two blocks the logits (max |logit| about 4 here) have differed by
2e-6 at most (5e-7 of the scale). A bound of 1e-5 of the scale leaves a factor 20 for rounding, and a mistake of
layout (a LoRA not transposed, a lost bias, v0 of the wrong layer, the ln_x epsilon) moves logits by 1e-2 or more.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from src.config import ModelConfig
from src.data.tokenizer import RWKVTokenizer
from src.model import RWKV
from tests.conftest import ROOT, run
from tests.data_helpers import LAMBADA

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
pytest.importorskip("fla")
pytest.importorskip("triton")

RELATIVE_TOLERANCE = 1e-5
CPU_ENV = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def perturbed_model(n_layer=2, n_embd=128, head_size=64, seed=0):
    """The init plus noise: the init zeroes the output projections and several LoRAs; noise makes every weight
    matter, so that a wrong layout of any of them changes the logits."""
    torch.manual_seed(seed)
    model = RWKV(ModelConfig(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=65536))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert all(p.abs().min() > 0 for p in model.parameters())
    return model.eval()


def export_folder(model, tmp_path, name):
    from tools.export_hf import main
    pth = os.path.join(tmp_path, f"{name}.pth")
    torch.save(model.state_dict(), pth)
    out = os.path.join(tmp_path, name)
    assert main([pth, out]) == 0
    return pth, out


# ---- in a subprocess under TRITON_INTERPRET=1 -------------------------------------------------------------------

def check_logits(tmp_path):
    from tests import fla_on_cpu
    fla_on_cpu.patch()
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV as PackageRWKV
    from transformers import AutoModelForCausalLM

    for head_size, lengths in ((64, (80, 20)), (32, (20,))):   # 32: the ln_x epsilon's value rescale
        model = perturbed_model(head_size=head_size)
        pth, folder = export_folder(model, tmp_path, f"head{head_size}")
        fla = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(fla).__name__ == "RWKV7ForCausalLM" and fla.config.head_dim == head_size
        package = PackageRWKV(pth[:-len(".pth")], "cpu fp32")
        for T in lengths:   # 80: fla's path for 64 tokens and more; 20: its recurrent path for short inputs
            idx = torch.randint(0, 65536, (2, T), generator=torch.Generator().manual_seed(T))
            with torch.no_grad():
                ours = model(idx)
                theirs = fla(idx).logits
            package_logits = torch.stack([package.forward(row.tolist(), None, full_output=True)[0] for row in idx])
            scale = ours.abs().max().item()
            assert scale > 1
            fla_ours = (theirs - ours).abs().max().item()
            fla_package = (theirs - package_logits).abs().max().item()
            print(f"head {head_size} T {T}: max |logit| {scale:.3f}, fla - ours {fla_ours:.2e}, "
                  f"fla - rwkv package {fla_package:.2e}")
            assert fla_ours <= RELATIVE_TOLERANCE * scale and fla_package <= RELATIVE_TOLERANCE * scale


def test_fla_logits_equal_rwkv_package_and_ours(tmp_path):
    result = run("-c", f"import tests.test_export_hf as t; t.check_logits({str(tmp_path)!r})", timeout=600,
                 env=CPU_ENV)
    print(result.stdout)


# ---- the tokenizer ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return export_folder(perturbed_model(n_layer=2, n_embd=64), tmp_path_factory.mktemp("export"), "small")


def test_folder_tokenizer_gives_our_ids(small_folder):
    from transformers import AutoTokenizer
    _, folder = small_folder
    ours = RWKVTokenizer()
    theirs = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with open(LAMBADA) as f:
        texts = [json.loads(line)["text"] for line in f]
    texts += ["Hello world, 😀 é\n\n  tabs\tand 123456 numbers", ""]
    for text in texts:
        ids = theirs.encode(text)
        assert ids == ours.encode(text)
        assert theirs.decode(ids) == text
    with_bos = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, add_bos_token=True)
    assert with_bos.encode(texts[0]) == [0] + ours.encode(texts[0])   # what lm-eval asks for: tools/eval.py's 0
    assert theirs(texts[:2], padding=True)["input_ids"][1][-1] == 0


# ---- errors ----------------------------------------------------------------------------------------------------

def test_export_errors_name_the_file(tmp_path):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    state = perturbed_model(n_layer=2, n_embd=64).state_dict()
    del state["blocks.1.att.v2"], state["blocks.0.ffn.value.weight"]
    torch.save(state, tmp_path / "cut.pth")
    other = {"emb.weight": torch.zeros(10, 4), "linear.weight": torch.zeros(4, 4)}
    torch.save(other, tmp_path / "other.pth")
    for name, problem in (("notes.pth", "is not a PyTorch checkpoint"),
                          ("cut.pth", "lacks 2 tensors of an RWKV-7 model (blocks.0.ffn.value.weight, "
                                      "blocks.1.att.v2)"),
                          ("other.pth", "is not an RWKV-7 model"),
                          ("missing.pth", "does not exist")):
        proc = subprocess.run([sys.executable, "tools/export_hf.py", str(tmp_path / name), str(tmp_path / "out")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: checkpoint {tmp_path / name} ") and problem in line, line
    assert not (tmp_path / "out").exists()


# ---- lm-evaluation-harness -------------------------------------------------------------------------------------

LM_EVAL_ITEMS = 8     # the fixture's first 8 LAMBADA passages (interpreted Triton: about 4 s of model time each)
BOOSTED = 1           # item 1's target " Shane" is one token: the model is made to predict it everywhere


def test_lm_eval_on_the_folder_equals_tools_eval(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from tools.eval import main as eval_main

    model = perturbed_model(n_layer=2, n_embd=64)
    with open(LAMBADA) as f:
        lines = [next(f) for _ in range(LM_EVAL_ITEMS)]
    (tmp_path / "lambada.jsonl").write_text("".join(lines))
    text = json.loads(lines[BOOSTED])["text"]
    (token,) = RWKVTokenizer().encode(text[text.rindex(" "):])
    with torch.no_grad():   # +30 on that token's logit at every position: one hit, so accuracy is not 0 = 0
        row = model.head.weight[token]
        model.ln_out.bias += 30 * row / row.norm() ** 2
    pth, folder = export_folder(model, tmp_path, "boosted")

    # the committed task, reading the items above
    with open(os.path.join(ROOT, "tools", "lm_eval_tasks", "lambada_jsonl.yaml")) as f:
        task = f.read()
    assert "test: data/lambada_test.jsonl" in task
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lambada_jsonl.yaml").write_text(
        task.replace("test: data/lambada_test.jsonl", f"test: {tmp_path / 'lambada.jsonl'}"))
    run("tests/fla_on_cpu.py", "lm-eval", "run", "--model", "hf", "--model_args",
        f"pretrained={folder},trust_remote_code=True,add_bos_token=True,dtype=float32", "--tasks", "lambada_jsonl",
        "--include_path", tmp_path / "tasks", "--device", "cpu", "--batch_size", LM_EVAL_ITEMS,
        "--output_path", tmp_path / "lm_eval", "--log_samples", timeout=600, env=CPU_ENV)
    (results,) = glob.glob(str(tmp_path / "lm_eval" / "*" / "results_*.json"))
    with open(results) as f:
        harness = json.load(f)["results"]["lambada_jsonl"]

    capsys.readouterr()
    assert eval_main(["--model", pth, "--lambada", str(tmp_path / "lambada.jsonl"), "--device", "cpu"]) == 0
    ours = json.loads(capsys.readouterr().out)
    print(f"lm-eval: acc {harness['acc,none']}, ppl {harness['perplexity,none']}; "
          f"tools/eval.py: acc {ours['accuracy']}, ppl {ours['ppl']}")
    assert harness["sample_len"] == ours["examples"] == LM_EVAL_ITEMS
    assert harness["acc,none"] == ours["accuracy"] == 1 / LM_EVAL_ITEMS
    assert harness["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-5)
