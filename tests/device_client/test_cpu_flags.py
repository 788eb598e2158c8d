"""The int8 CPU flags in a device's hardware facts: read from /proc/cpuinfo, or set by
``FLEET_DEVICE_CPU_FLAGS``, and sent in the presence of every connect."""

from __future__ import annotations

import json
import queue

from device_client.config import DeviceSettings
from device_client.enroll import cpu_flags_from_cpuinfo, hardware_facts, read_cpu_flags
from device_client.protocol import HardwareFacts
from tests.helpers.testbed import DEVICE_ID, running_testbed

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse4_2 avx avx2 avx512f avx512_vnni avx_vnni sha_ni
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp i8mm
CPU implementer\t: 0x41
"""


def test_flags_from_cpuinfo():
    assert cpu_flags_from_cpuinfo(X86) == ["avx512_vnni", "avx_vnni", "avx2"]
    assert cpu_flags_from_cpuinfo(ARM) == ["asimddp", "i8mm"]
    assert cpu_flags_from_cpuinfo("flags : sse sse2\n") == []
    assert cpu_flags_from_cpuinfo("") == []


def test_hardware_facts_read_cpuinfo_or_the_setting(tmp_path):
    assert hardware_facts().cpu_flags == read_cpu_flags()
    assert hardware_facts(" i8mm, asimddp ").cpu_flags == ["i8mm", "asimddp"]
    assert hardware_facts("").cpu_flags == []
    assert read_cpu_flags(tmp_path / "missing") == []
    settings = DeviceSettings(data_dir=tmp_path, cpu_flags="avx_vnni")
    assert hardware_facts(settings.cpu_flags).cpu_flags == ["avx_vnni"]


def test_facts_without_flags_still_parse():
    """Devices that predate the field send no cpu_flags; the server reads none."""
    facts = HardwareFacts.model_validate(
        {"arch": "x86_64", "ram_mb": 1, "cpu_count": 1, "onnxruntime_version": "1.0"}
    )
    assert facts.cpu_flags == []


def test_presence_carries_the_flags_of_the_setting(tmp_path):
    with running_testbed(tmp_path, cpu_flags="asimddp,i8mm") as tb:
        got: queue.Queue[bytes] = queue.Queue()
        topic = f"fleet/v1/d/{DEVICE_ID}/presence"
        assert tb.server is not None
        tb.server.message_callback_add(topic, lambda c, u, m: got.put(m.payload))
        tb.server.subscribe(topic, qos=1)
        presence = json.loads(got.get(timeout=20))  # the retained online presence
        assert presence["status"] == "online"
        assert presence["hardware"]["cpu_flags"] == ["asimddp", "i8mm"]
