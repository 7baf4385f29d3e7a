import numpy as np

from ipfixer.clock import FakeClock, mono_to_wall_ms
from ipfixer.model import FLOW_DTYPE, FlowRecord, addr16_to_str, batch_to_records, records_to_batch, to_addr16


def test_record_batch_round_trip() -> None:
    rec = FlowRecord(src_addr=to_addr16("10.0.0.1"), dst_addr=to_addr16("2001:db8::1"), packets=3, octets=300,
                     src_port=1234, dst_port=80, protocol=6, ifindex=7, start_ms=1, end_ms=2)
    batch = records_to_batch([rec, rec])
    assert batch.dtype == FLOW_DTYPE and len(batch) == 2
    assert batch_to_records(batch) == [rec, rec]
    assert addr16_to_str(rec.src_addr) == "10.0.0.1"
    assert addr16_to_str(rec.dst_addr) == "2001:db8::1"
    assert int(np.sum(batch["octets"])) == 600


def test_mono_to_wall() -> None:
    clock = FakeClock(wall=10_000_000_000, mono=5_000_000_000)
    assert mono_to_wall_ms(4_000_000_000, clock.wall_ns(), clock.mono_ns()) == 9_000
