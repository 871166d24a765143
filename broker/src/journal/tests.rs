use super::*;

/// Records of varied sizes, each telling its number.
fn records(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut r = format!("record {i} ").into_bytes();
            r.extend(std::iter::repeat_n(b'x', (i * 37) % 300));
            r
        })
        .collect()
}

/// A disk holding one committed segment of `recs`.
fn written(recs: &[Vec<u8>]) -> MemDisk {
    let (mut j, _) = Journal::open(MemDisk::default(), Options::default()).unwrap();
    for r in recs {
        j.append(r);
    }
    j.commit().unwrap();
    j.into_disk()
}

fn only_segment(disk: &MemDisk) -> String {
    let names = disk.list().unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    names[0].clone()
}

/// Where each record starts in a segment of `recs`, and where the last ends.
fn boundaries(recs: &[Vec<u8>]) -> Vec<usize> {
    let mut b = vec![0];
    for r in recs {
        b.push(b.last().unwrap() + HEADER + r.len());
    }
    b
}

#[test]
fn records_come_back_in_order_after_a_reopen_and_appends_go_to_a_new_segment() {
    let recs = records(50);
    let disk = written(&recs);
    let (mut j, rec) = Journal::open(disk, Options::default()).unwrap();
    assert_eq!(rec.records, recs);
    assert_eq!(rec.torn_bytes, 0);
    assert_eq!(j.append(b"fifty-first"), 51);
    assert_eq!(j.commit().unwrap(), 51);
    let names = j.disk().list().unwrap();
    assert_eq!(names.len(), 2, "{names:?}");
    let (_, rec) = Journal::open(j.into_disk(), Options::default()).unwrap();
    assert_eq!(rec.records.len(), 51);
    assert_eq!(rec.records[50], b"fifty-first");
}

#[test]
fn a_commit_is_one_sync_however_many_records_it_covers() {
    let (mut j, _) = Journal::open(MemDisk::default(), Options::default()).unwrap();
    for r in records(1000) {
        j.append(&r);
    }
    assert_eq!(j.pending(), 1000);
    assert_eq!(j.commit().unwrap(), 1000);
    assert_eq!(j.disk().syncs, 1);
    // Nothing buffered: no write, no sync.
    assert_eq!(j.commit().unwrap(), 1000);
    assert_eq!(j.disk().syncs, 1);
}

#[test]
fn a_record_cut_at_every_byte_is_dropped_as_a_torn_tail() {
    let recs = records(12);
    let full = written(&recs);
    let name = only_segment(&full);
    let bytes = full.read(&name).unwrap();
    let bounds = boundaries(&recs);
    for cut in 0..=bytes.len() {
        for zeros in [0, 5, 4096] {
            let mut disk = full.clone();
            let b = disk.bytes_mut(&name).unwrap();
            b.truncate(cut);
            b.extend(std::iter::repeat_n(0u8, zeros));
            let (_, rec) = Journal::open(disk, Options::default())
                .unwrap_or_else(|e| panic!("cut at {cut} + {zeros} zeros: {e}"));
            let whole = bounds.iter().rposition(|b| *b <= cut).unwrap();
            assert_eq!(rec.records, recs[..whole], "cut at {cut} + {zeros} zeros");
            assert_eq!(
                rec.torn_bytes as usize,
                cut - bounds[whole] + zeros,
                "cut at {cut} + {zeros} zeros"
            );
        }
    }
}

#[test]
fn a_flipped_bit_in_any_record_stops_the_open_but_in_the_last_one_it_is_a_torn_tail() {
    let recs = records(6);
    let full = written(&recs);
    let name = only_segment(&full);
    let len = full.read(&name).unwrap().len();
    let bounds = boundaries(&recs);
    for bit in 0..len * 8 {
        let mut disk = full.clone();
        disk.bytes_mut(&name).unwrap()[bit / 8] ^= 1 << (bit % 8);
        let record = bounds.iter().rposition(|b| *b <= bit / 8).unwrap();
        match Journal::open(disk, Options::default()) {
            Ok((_, rec)) => {
                assert_eq!(record, recs.len() - 1, "bit {bit}: a damaged record passed");
                assert_eq!(rec.records, recs[..record], "bit {bit}");
                assert_eq!(rec.torn_bytes as usize, len - bounds[record], "bit {bit}");
            }
            Err(OpenError::Corrupt {
                segment, offset, ..
            }) => {
                assert_eq!(segment, name);
                assert_eq!(offset as usize, bounds[record], "bit {bit}");
            }
            Err(e) => panic!("bit {bit}: {e}"),
        }
    }
}

#[test]
fn salvage_keeps_the_records_before_the_damage_and_sets_the_rest_aside() {
    let recs = records(10);
    let mut disk = written(&recs);
    let name = only_segment(&disk);
    let bounds = boundaries(&recs);
    // Damage record 4's payload.
    disk.bytes_mut(&name).unwrap()[bounds[4] + HEADER + 1] ^= 0x40;
    let err = Journal::open(disk.clone(), Options::default())
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains(&name) && message.contains(&bounds[4].to_string()),
        "{message}"
    );
    assert!(message.contains("--salvage-journal"), "{message}");
    let salvage = Options {
        salvage: true,
        ..Options::default()
    };
    let (mut j, rec) = Journal::open(disk, salvage).unwrap();
    assert_eq!(rec.records, recs[..4]);
    let (at_segment, at, aside) = rec.salvaged.unwrap();
    assert_eq!((at_segment, at as usize), (name.clone(), bounds[4]));
    assert_eq!(aside, vec![format!("{name}.damaged")]);
    j.append(b"after the salvage");
    j.commit().unwrap();
    // The next start needs no salvage, and the damaged file is still there.
    let disk = j.into_disk();
    assert!(disk.list().unwrap().contains(&format!("{name}.damaged")));
    let (_, rec) = Journal::open(disk, Options::default()).unwrap();
    assert_eq!(rec.records.len(), 5);
    assert_eq!(rec.records[4], b"after the salvage");
}

#[test]
fn a_power_cut_keeps_what_was_synced_and_loses_the_rest() {
    let (mut j, _) = Journal::open(MemDisk::default(), Options::default()).unwrap();
    j.append(b"synced");
    j.commit().unwrap();
    j.append(b"buffered, never committed");
    let mut disk = j.into_disk();
    disk.crash();
    let (_, rec) = Journal::open(disk, Options::default()).unwrap();
    assert_eq!(rec.records, vec![b"synced".to_vec()]);
    // Without fsync a commit survives the process, not the power cut.
    let never = Options {
        fsync: Fsync::Never,
        ..Options::default()
    };
    let (mut j, _) = Journal::open(MemDisk::default(), never).unwrap();
    j.append(b"written, not synced");
    j.commit().unwrap();
    let process_crash = j.disk().clone();
    let (_, rec) = Journal::open(process_crash, Options::default()).unwrap();
    assert_eq!(rec.records.len(), 1);
    let mut power_cut = j.into_disk();
    power_cut.crash();
    let (_, rec) = Journal::open(power_cut, Options::default()).unwrap();
    assert!(rec.records.is_empty());
}

#[test]
fn a_failed_fsync_is_an_error_to_the_committer() {
    let (mut j, _) = Journal::open(MemDisk::default(), Options::default()).unwrap();
    j.append(b"one");
    j.commit().unwrap();
    let mut disk = j.into_disk();
    disk.fail_syncs();
    let (mut j, _) = Journal::open(disk, Options::default()).unwrap();
    j.append(b"two");
    assert!(j.commit().is_err());
}

#[test]
fn segments_roll_over_at_their_size() {
    let small = Options {
        segment_bytes: 1000,
        ..Options::default()
    };
    let (mut j, _) = Journal::open(MemDisk::default(), small).unwrap();
    for r in records(40) {
        j.append(&r);
        j.commit().unwrap();
    }
    let segments = j.disk().list().unwrap().len();
    assert!(segments > 3, "{segments} segments");
    let (_, rec) = Journal::open(j.into_disk(), small).unwrap();
    assert_eq!(rec.records, records(40));
}

#[test]
fn a_directory_is_locked_by_its_process() {
    let dir = std::env::temp_dir().join(format!(
        "miyamoto-journal-lock-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    let first = DirDisk::open(&dir).unwrap();
    let second = DirDisk::open(&dir).err().expect("a second open fails");
    let message = second.to_string();
    assert!(
        message.contains(&dir.display().to_string())
            && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    drop(first);
    // Released with its holder: the directory opens again, and a journal
    // written through it reads back.
    let disk = DirDisk::open(&dir).unwrap();
    let (mut j, _) = Journal::open(disk, Options::default()).unwrap();
    j.append(b"on a real disk");
    j.commit().unwrap();
    drop(j);
    let (_, rec) = Journal::open(DirDisk::open(&dir).unwrap(), Options::default()).unwrap();
    assert_eq!(rec.records, vec![b"on a real disk".to_vec()]);
    let _ = std::fs::remove_dir_all(&dir);
}
