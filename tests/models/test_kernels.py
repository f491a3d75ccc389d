import pytest

from veridraft.models import kernels, q4kernel

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}


@pytest.mark.parametrize(
    ("flags", "isa"),
    [
        (AVX512, "avx512bf16"),
        (AVX512 - {"avx512_bf16"}, "avx2"),  # AVX-512 without BF16: Skylake-SP, Ice Lake
        (AVX2, "avx2"),
        (AVX2 - {"f16c"}, None),
        ({"sse4_2", "avx"}, None),
        (set(), None),  # no /proc/cpuinfo (not Linux)
    ],
)
def test_each_cpu_gets_the_newest_build_it_runs(monkeypatch, flags, isa):
    monkeypatch.delenv("VERIDRAFT_ISA", raising=False)  # the suite may run under a cap
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: flags)
    assert kernels.isa() == isa
    assert kernels.cpu_supported() == (isa == "avx512bf16")  # the attention kernel's build
    assert q4kernel.cpu_supported() == (isa is not None)


def test_the_flags_are_read_from_the_flags_line(tmp_path, monkeypatch):
    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx avx2 fma f16c\n"
    real = kernels.Path
    monkeypatch.setattr(
        kernels, "Path", lambda p: tmp_path / "cpuinfo" if p == "/proc/cpuinfo" else real(p)
    )
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.delenv("VERIDRAFT_ISA", raising=False)
    assert kernels._cpu_flags() == {"fpu", "avx", "avx2", "fma", "f16c"}
    assert kernels.isa() == "avx2"


@pytest.mark.parametrize(
    ("flags", "cap", "isa"),
    [
        (AVX512, "avx2", "avx2"),  # an AVX-512 machine runs what an AVX2-only CPU would
        (AVX512, "AVX512BF16", "avx512bf16"),
        (AVX2, "avx512bf16", "avx2"),  # a cap never raises the build past the CPU
        (AVX512, "none", None),
    ],
)
def test_veridraft_isa_caps_the_build(monkeypatch, flags, cap, isa):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: flags)
    monkeypatch.setenv("VERIDRAFT_ISA", cap)
    assert kernels.isa() == isa


def test_an_unknown_veridraft_isa_is_named(monkeypatch):
    monkeypatch.setenv("VERIDRAFT_ISA", "sse2")
    with pytest.raises(ValueError, match="VERIDRAFT_ISA='sse2'.*avx2"):
        kernels.isa()
