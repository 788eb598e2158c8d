"""Which variant of a version each device gets, counted for many devices at once
(:func:`server.rollouts.desired.count_variants`): what the preview shows and rollout creation
checks, on the director's own choice."""

from __future__ import annotations

from types import SimpleNamespace

from server.catalog.tables import ModelArtifact
from server.rollouts.desired import count_variants, hardware_kind


def artifact(variant: str, **constraints) -> ModelArtifact:
    return ModelArtifact(variant=variant, constraints=constraints)


def device(device_id: str, arch: str = "x86_64", **hardware) -> SimpleNamespace:
    facts = {"ram_mb": 4096, "execution_providers": ["CPUExecutionProvider"]} | hardware
    return SimpleNamespace(id=device_id, arch=arch, hardware=facts)


def test_devices_alike_but_for_cpu_flags_get_different_variants():
    artifacts = [artifact("default"), artifact("int8", cpu_flags=["avx512_vnni"])]
    devices = [device("a", cpu_flags=["avx2"]), device("b", cpu_flags=["avx512_vnni", "avx2"]),
               device("c"), device("d", cpu_flags=["avx512_vnni"])]  # fmt: skip
    counts, unfit = count_variants(artifacts, devices)
    assert (dict(counts), unfit) == ({"default": 2, "int8": 2}, [])


def test_devices_no_variant_fits_are_listed_in_order():
    artifacts = [artifact("arm", arch=["aarch64"]), artifact("vnni", cpu_flags=["avx512_vnni"])]
    devices = [device("pi", arch="aarch64"), device("old"), device("new", cpu_flags=["avx512_vnni"]),
               device("small", arch="aarch64", ram_mb=256), device("older")]  # fmt: skip
    counts, unfit = count_variants(artifacts, devices)
    assert dict(counts) == {"arm": 2, "vnni": 1}
    assert unfit == ["old", "older"]


def test_every_variant_is_listed_and_no_constraint_fits_all():
    artifacts = [artifact("default"), artifact("gpu", providers=["CUDAExecutionProvider"])]
    unknown = SimpleNamespace(id="b", arch="aarch64", hardware=None)  # no facts reported yet
    counts, unfit = count_variants(artifacts, [device("a"), unknown])
    assert (dict(counts), unfit) == ({"default": 2, "gpu": 0}, [])


def test_the_kind_holds_everything_a_fit_reads():
    base = device("a").hardware
    kinds = {
        hardware_kind("x86_64", base),
        hardware_kind("aarch64", base),
        hardware_kind("x86_64", base | {"ram_mb": 512}),
        hardware_kind("x86_64", base | {"execution_providers": []}),
        hardware_kind("x86_64", base | {"cpu_flags": ["avx2"]}),
    }
    assert len(kinds) == 5
