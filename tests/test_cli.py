import json

from typer.testing import CliRunner

from cai_bootstrap.cli import app

runner = CliRunner()


def test_help_lists_commands_and_each_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = ["generate", "validate", "status", "models"]
    for c in commands:
        assert c in result.output
    for c in commands:
        r = runner.invoke(app, [c, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def test_validate_exit_codes(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "prompt": "Instruction: hi\nResponse:"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": ""}) + "\n{oops\n")
    assert runner.invoke(app, ["validate", "prompts", str(good)]).exit_code == 0
    r = runner.invoke(app, ["validate", "prompts", str(bad)])
    assert r.exit_code == 1
    assert f"{bad}:1: prompt:" in r.output and f"{bad}:2: (json):" in r.output
    assert runner.invoke(app, ["validate", "nonsense", str(good)]).exit_code == 2


def test_generate_writes_records_in_order_with_provenance(tmp_path, tiny_model_folder):
    prompts = tmp_path / "p.jsonl"
    ids = ["z", "a", "m"]
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Instruction: item {i} " * (k + 1) + "\nResponse:"}) + "\n"
                               for k, i in enumerate(ids)))
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["generate", "--model", str(tiny_model_folder), "--prompts", str(prompts),
                            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ids
    assert all(x["finish_reason"] in ("stop", "eos", "length") for x in recs)
    prov = json.loads((tmp_path / "o.jsonl.provenance.json").read_text())
    assert prov["quantization"] == "none" and prov["add_bos_token"] is False
    assert prov["decoding"]["max_new_tokens"] == 5
    assert runner.invoke(app, ["validate", "generations", str(out)]).exit_code == 0


def test_generate_rejects_bad_prompts_file(tmp_path, tiny_model_folder):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a"}\n')
    r = runner.invoke(app, ["generate", "--model", str(tiny_model_folder), "--prompts", str(prompts),
                            "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1 and "p.jsonl:1: prompt: Field required" in r.output
    assert not (tmp_path / "o.jsonl").exists()


def test_models_list_and_prepare(smollm2_folder):
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "smollm2-135m" in r.output and "yes" in r.output
    r = runner.invoke(app, ["models", "prepare", "smollm2-135m"])
    assert r.exit_code == 0 and str(smollm2_folder) in r.output and "already prepared" in r.output


def test_status_shows_steps_with_counts(tmp_path):
    from cai_bootstrap.config import load_config
    from cai_bootstrap.run import Run

    run = Run(tmp_path, load_config(None))
    run.path("in.txt").write_text("x")
    with run.step("make", "p", ["in.txt"], ["in.txt"]) as rec:
        rec.kept = 7
        rec.drop("too_short", 2)
    r = runner.invoke(app, ["status", str(tmp_path)])
    assert r.exit_code == 0
    assert "make" in r.output and "done" in r.output and "7" in r.output and "too_short=2" in r.output
    assert runner.invoke(app, ["status", str(tmp_path / "nope")]).exit_code == 1


def test_inspect_masks_json_shows_only_the_response_supervised(tmp_path, smollm2_folder):
    data = tmp_path / "d.jsonl"
    rows = [{"id": "s1", "instruction": "Name a color.", "response": "Blue."},
            {"id": "r1", "text": "Instruction: Say hi.\nResponse: Hi there!\nEND"},
            {"id": "bad", "text": "no separator here\nEND"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["inspect-masks", str(data), "--model", str(smollm2_folder), "--json"])
    assert r.exit_code == 0, r.output
    out = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [o["id"] for o in out] == ["s1", "r1", "bad"]
    assert out[0]["supervised_text"].startswith(" Blue.\nEND") and out[0]["dropped"] is None
    assert out[1]["supervised_text"].startswith(" Hi there!\nEND") and out[1]["n_prompt_tokens"] > 0
    assert out[2]["dropped"] is not None and out[2]["n_supervised_tokens"] == 0
