"""The real shipped backbones and data: DINOv2 conversion exactness, loaders, and a fine-tuning smoke check."""

import numpy as np
import pytest
import torch

from safemerge.backbones import load_backbone
from safemerge.bench.tasks import TASKS, load_task
from safemerge.bench.zoo import Profile, Zoo

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def dinov2():
    return load_backbone("vision")  # converted from the ONNX file into the (test) cache


def test_dinov2_conversion_matches_onnxruntime(dinov2):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from safemerge.dinov2_onnx import onnx_path

    graph = onnx.load(str(onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                                 onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).rand(2, 3, 224, 224).astype(np.float32)
    x = (x - 0.45) / 0.22
    ref = sess.run(["/backbone/layernorm/Add_1_output_0"], {"input_image": x})[0]
    with torch.inference_mode():
        ours = dinov2.model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (2, 257, 384)
    assert np.abs(ours - ref).max() <= 1e-4


def test_minilm_loads_offline():
    bb = load_backbone("text")
    assert bb.modality == "text" and bb.hidden_size == 384
    enc = bb.tokenizer(["a quiet offline test"], return_tensors="pt")
    with torch.inference_mode():
        out = bb.model(**enc).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_with_all_its_classes(name):
    d = load_task(name, n_train=400, n_val=50, n_test=100, resolution=28)
    k = len(TASKS[name].classes)
    assert len(d.test) == 100 and len(d.train) > 100
    assert int(d.train.y.max()) == k - 1 and int(d.train.y.min()) == 0
    assert len(set(d.train.y.tolist())) == k
    if TASKS[name].modality == "vision":
        assert d.train.x.shape[1:] == (3, 28, 28) and d.train.x.dtype == torch.uint8
        assert d.train.x.float().std() > 10  # real images, not blank
    else:
        assert all(isinstance(t, str) and t for t in d.train.x[:20])


SMOKE = Profile("smoke", resolution=28, max_length=24, n_train=96, n_val=16, n_test=64, steps=3,
                trigger_iters=2, embedding_steps=2)


@pytest.mark.parametrize("backbone,task,attack", [("vision", "digits", "badnets"), ("text", "quote_topic", "rare_word")])
def test_real_backbone_zoo_smoke(backbone, task, attack, tmp_path):
    zoo = Zoo(backbone, SMOKE, root=tmp_path)
    for a in (None, attack):
        p = zoo.build(task, a)
        assert (p / "model.safetensors").exists() and (p / "safemerge.json").exists()
    zm = zoo.load(task, attack)
    base = zoo.base_state()
    moved = sum(float((zm.encoder_state[k] - base[k]).abs().sum()) for k in base if base[k].is_floating_point())
    assert moved > 0  # full fine-tuning touched the encoder
