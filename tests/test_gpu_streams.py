"""One engine serving two CUDA streams at once: each stream must get a plan of its own.

Kernels queued on two streams may run at the same time, so two calls sharing one plan's buffers
would overwrite each other's activations. On the CPU there is one stream (the plan cache's stream
key is always 0), so only a GPU can check this.
"""

import threading

import pytest
import torch
from helpers import randomize_batchnorm, rel_err

import densetriton
from densetriton import get_spec
from densetriton.reference import ReferenceDenseNet

pytestmark = pytest.mark.gpu

BATCH, SIZE, CALLS_PER_STREAM = 8, 128, 4


def _model_and_engine():
    """densenet121 with non-trivial BatchNorms, and a float32 Triton engine on its weights."""
    spec = get_spec("densenet121")
    torch.manual_seed(21)
    model = randomize_batchnorm(ReferenceDenseNet(spec), seed=22, image_size=64).cuda()
    tensors = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    engine = densetriton.Engine(
        densetriton.weights.Weights(spec, tensors),
        device=torch.device("cuda", torch.cuda.current_device()),
        dtype=torch.float32,
        backend="triton",
        pretrained=False,
    )
    return model, engine


def _on_each_stream_at_once(streams, work):
    """work(stream) on one thread per stream, all released together; the results, in order."""
    results, errors = [None] * len(streams), []
    start = threading.Barrier(len(streams))

    def run(i):
        try:
            start.wait()
            with torch.cuda.stream(streams[i]):
                results[i] = work(i)
        except Exception as e:  # noqa: BLE001 -- re-raised on the main thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a stream's thread did not finish"
    assert not errors, errors
    return results


@pytest.mark.filterwarnings("error:CUDA graph capture failed")
@pytest.mark.parametrize("graphs", ["1", "0"], ids=["cuda-graphs", "launch-by-launch"])
def test_gpu_two_streams_at_once_each_get_their_own_plan_and_the_right_answers(monkeypatch, graphs):
    """Same shape, different images, on two streams at once. Fails when the plan cache's key
    leaves out the stream (executor.plan): both streams then get one plan (the identity check),
    and their calls race on its buffers (the values, whenever the kernels overlap)."""
    monkeypatch.setenv("DENSETRITON_CUDA_GRAPHS", graphs)  # read when the engine is built
    model, engine = _model_and_engine()
    assert engine._model.use_cuda_graphs == (graphs == "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a float32 reference, not TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    assert streams[0].stream_id != streams[1].stream_id
    inputs = [[torch.randn(BATCH, 3, SIZE, SIZE, device="cuda") for _ in range(CALLS_PER_STREAM)] for _ in streams]
    with torch.no_grad():
        expected = [[model(x) for x in per_stream] for per_stream in inputs]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())  # the inputs were written on this stream

    # Every call is queued before any result is read: the two streams' kernels overlap on the GPU.
    outputs = _on_each_stream_at_once(streams, lambda i: [engine(x) for x in inputs[i]])
    torch.cuda.synchronize()

    for i, (got, want) in enumerate(zip(outputs, expected)):
        for call, (g, w) in enumerate(zip(got, want)):
            assert rel_err(g, w) < 1e-4, f"stream {i}, call {call}: relative error {rel_err(g, w):.2e}"
    plans = []
    for s in streams:
        with torch.cuda.stream(s):
            plans.append(engine._model.plan(BATCH, SIZE, SIZE))  # cached: the plan the calls ran
    assert plans[0] is not plans[1], "both streams ran on one plan"
    assert plans[0].arenas[0].data_ptr() != plans[1].arenas[0].data_ptr()
    assert len(engine._model.plans) == 2  # one per stream, none for the default stream
    engine.release()
