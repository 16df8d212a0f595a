"""Tests for one place per idea and what runs is what is read: the RoPE and kernel choices made once a forward, the
packing's two shapes, one dtype reader, one device picker, one way to point a warning at the user's line, one
cu_seqlens helper, and a bench that changes nothing global. (To be folded into the per-file test files.)"""

import warnings

import pytest
import torch

import modernbert as mb

try:
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (the oracle) is not installed")

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=2,
    local_attention=8,
    pad_token_id=0,
    max_position_embeddings=1024,
)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    mb.ModernBertForMaskedLM(mb.ModernBertConfig(**TINY)).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


# ----------------------------------------------------------------------------------------------------
# The choices a forward makes, in encode and attention_kernels


@pytest.mark.parametrize(
    "dtype, autocast, chunked",
    [
        (torch.bfloat16, False, True),
        (torch.float16, False, True),
        (torch.float32, True, True),
        (torch.float32, False, False),
    ],
    ids=["bf16", "fp16", "fp32-under-bf16-autocast", "fp32"],
)
def test_rope_is_chunked_exactly_for_half_precision_on_a_cpu(dtype, autocast, chunked, monkeypatch):
    """encode chooses RoPE in pieces once a forward, from the dtype the layers compute in (autocast's, not the hidden
    states'): half precision on a CPU, and never in fp32. The pieces give the numbers of one pass."""
    torch.manual_seed(0)
    model = mb.ModernBertModel(mb.ModernBertConfig(**TINY)).to(dtype).eval()
    ids = torch.randint(1, 64, (2, mb.ROPE_CHUNK + 50))
    calls, real = [], mb.rope_in_chunks
    monkeypatch.setattr(mb, "rope_in_chunks", lambda x, cos, sin: calls.append(x.dtype) or real(x, cos, sin))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids).last_hidden_state
        assert len(calls) == (TINY["num_hidden_layers"] if chunked else 0), calls
        monkeypatch.setattr(mb, "rope_in_chunks", mb.apply_rope)  # one pass, the same numbers
        assert torch.equal(out, model(ids).last_hidden_state)


def test_rope_in_chunks_is_one_pass_when_short():
    x = torch.randn(mb.ROPE_CHUNK, 2, 4, 64, dtype=torch.bfloat16)  # (T, 2, H, D): q and k
    cos, sin = mb.rope_tables(*mb.rope_frequencies(mb.ModernBertConfig(), "full_attention"), torch.arange(x.shape[0]))
    assert torch.equal(mb.rope_in_chunks(x, cos, sin), mb.apply_rope(x, cos, sin))


def test_the_flash_kernel_is_looked_up_once_a_forward(monkeypatch):
    """attention_kernels asks for the flash kernel once, whether it was named or None may pick it, and binds it to
    every layer's kernel; it is not asked for again while the layers run."""
    looked_up = []
    kernel = object()
    monkeypatch.setattr(mb, "find_flash_kernel", lambda device: looked_up.append(device) or kernel)
    ragged = mb.Packing.from_mask(torch.tensor([[1, 1, 1], [1, 1, 0]]))
    gpu = torch.device("cuda")  # a device object only: nothing runs on a GPU here
    for name in (None, "flash_attention_2"):
        looked_up.clear()
        chosen = mb.attention_kernels(name, gpu, torch.bfloat16, ragged, 4)
        assert len(looked_up) == 1, name
        assert all(k.func is mb.flash_attention and k.keywords["varlen"] is kernel for k in chosen.values()), name
    looked_up.clear()  # None never picks flash for fp32: no lookup at all
    assert set(mb.attention_kernels(None, gpu, torch.float32, ragged, 4).values()) == {mb.sdpa_attention}
    assert looked_up == []


def test_no_name_falls_through_to_a_kernel_it_did_not_ask_for(monkeypatch):
    """Each name maps to its own kernel, stated in attention_kernels: an unknown name is an error, not flex."""
    packing = mb.Packing.from_mask(torch.ones(2, 5, dtype=torch.long))
    cpu = torch.device("cpu")
    assert set(mb.attention_kernels("eager", cpu, torch.float32, packing, 2).values()) == {mb.eager_attention}
    assert mb.attention_kernels("sdpa", cpu, torch.float32, packing, 2)["sliding_attention"] is mb.sdpa_attention
    with pytest.raises(ValueError, match="'xformers' is unknown"):
        mb.attention_kernels("xformers", cpu, torch.float32, packing, 2)


# ----------------------------------------------------------------------------------------------------
# The packing's two shapes


def test_packing_names_its_two_shapes_apart_under_left_padding():
    """padded_seq_index places tokens in (N, max_seqlen), one right-padded row a sequence; to_input_shape puts them
    back where the input had them, (B, S), left padding included. Under left padding the two differ."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    packing = mb.Packing.from_mask(mask)
    tokens = torch.arange(1, 6)  # the packed stream: 1, 2 (row 0), 3, 4, 5 (row 1)
    by_sequence = mb.pad(tokens, packing.padded_seq_index, packing.num_seqs, packing.max_seqlen)
    assert by_sequence.tolist() == [[1, 2, 0], [3, 4, 5]]
    assert packing.to_input_shape(tokens).tolist() == [[0, 0, 1, 2], [3, 4, 5, 0]]


def test_cu_seqlens_from_lengths():
    cu = mb.cu_seqlens_from_lengths(torch.tensor([3, 0, 5]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8]
    assert mb.cu_seqlens_from_lengths([2, 2]).tolist() == [0, 2, 4]  # a list, as train.py has its lengths
    assert torch.equal(mb.Packing.from_mask(torch.tensor([[1, 1, 1], [1, 0, 0]])).cu_seqlens, torch.tensor([0, 3, 4]))


# ----------------------------------------------------------------------------------------------------
# One dtype reader, one device picker, one way to warn at the user's line


@pytest.mark.parametrize("name", sorted(mb.DTYPES))
def test_every_door_reads_the_same_dtype_names(name, tiny_checkpoint):
    """from_pretrained and load.py take the same names ("bf16" and "bfloat16" alike) and refuse the same ones."""
    import load

    assert mb.ModernBertForMaskedLM.from_pretrained(tiny_checkpoint, dtype=name).dtype == mb.DTYPES[name]
    assert load.load_model(tiny_checkpoint, dtype=name).dtype == mb.DTYPES[name]
    assert mb.parse_dtype(mb.DTYPES[name]) is mb.DTYPES[name] and mb.parse_dtype(None) is None
    for door in (mb.ModernBertForMaskedLM.from_pretrained, load.load_model):
        with pytest.raises(ValueError, match=r"Unknown dtype 'int8': pass a torch dtype"):
            door(tiny_checkpoint, dtype="int8")
    assert load.parse_args(["--dtype", name]).dtype == name


def test_one_device_picker_for_every_door(monkeypatch):
    """modernbert.pick_device: a named device, or the accelerator torch sees (MPS too), else the CPU; a GPU named
    where there is none is an error. load.py, embed.py and bench.py use it (bench on the devices its tables cover)."""
    import bench
    import embed
    import load

    assert load.pick_device is embed.pick_device is mb.pick_device
    assert mb.pick_device("cpu") == mb.pick_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    assert mb.pick_device() == mb.pick_device("auto") == mb.single_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="torch sees no CUDA GPU here"):
        mb.pick_device("cuda")
    mps = torch.device("mps")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: mps)
    assert mb.pick_device() == mb.single_device("auto") == mps  # load.py's own picker used to ignore MPS
    assert bench.pick_device("auto") == torch.device("cpu")  # the bench's tables are the CPU's and CUDA's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mb.pick_device() == mb.pick_device("cuda") == bench.pick_device("auto") == torch.device("cuda")


def test_warnings_point_past_every_file_of_the_project(tiny_checkpoint):
    """One mechanism (modernbert.users_line over LIBRARY_FILES) for every door: the loader's report and the
    deprecated torch_dtype point at the line that called from_pretrained or load.py (embed.py: test_modernbert)."""
    import embed
    import load

    assert {mb.__file__, load.__file__, embed.__file__} <= mb.LIBRARY_FILES
    doors = {
        "from_pretrained": lambda: mb.ModernBertForSequenceClassification.from_pretrained(tiny_checkpoint),
        "torch_dtype": lambda: mb.ModernBertModel.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32),
        "load_model": lambda: load.load_model(tiny_checkpoint, task="sequence-classification"),
    }
    for door, call in doors.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert caught, door
        assert {w.filename for w in caught} == {__file__}, (door, [(w.filename, w.lineno) for w in caught])


# ----------------------------------------------------------------------------------------------------
# bench.py builds its models with each library's own init and changes nothing global


@pytest.mark.slow
@needs_transformers
def test_bench_builds_models_without_replacing_any_initialiser():
    import transformers.initialization

    import bench

    torch_init, theirs_init = torch.nn.init.trunc_normal_, transformers.initialization.TORCH_INIT_FUNCTIONS.copy()
    bench.build_models("ours", torch.float32, torch.device("cpu"), "sdpa")
    assert torch.nn.init.trunc_normal_ is torch_init
    assert theirs_init == transformers.initialization.TORCH_INIT_FUNCTIONS
