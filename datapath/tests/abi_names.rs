//! The ABI crate's map and program names, and its key/value sizes, against the built object:
//! the eBPF side must spell names as literals in attributes, so only this test ties them.

use std::collections::BTreeSet;

use membrane_common::{
    CtEntry, CtKeyV4, EndpointInfo, IpcacheKeyV4, IpcacheValue, Lb4Affinity, Lb4AffinityKey,
    Lb4Backend, Lb4Nat, Lb4NatKey, Lb4ReverseSk, Lb4ReverseSkKey, Lb4Service, Lb4ServiceKey,
    Lb4SlotKey, LbAffinityMatchKey, LbConfig, MaglevTable, MetricsValue, PolicyEntry, PolicyKey,
    names,
};
use membrane_datapath::{Datapath, MapSizes, object::EBPF_OBJECT};
use membrane_tests::{PinGuard, require_root};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

fn symbols_in(prefix: &str) -> BTreeSet<String> {
    let file = object::File::parse(EBPF_OBJECT).expect("the embedded object is an ELF file");
    let mut out = BTreeSet::new();
    for sym in file.symbols() {
        let Some(index) = sym.section_index() else {
            continue;
        };
        let Ok(section) = file.section_by_index(index) else {
            continue;
        };
        let Ok(section_name) = section.name() else {
            continue;
        };
        if section_name.starts_with(prefix)
            && let Ok(name) = sym.name()
            && !name.is_empty()
            && !name.starts_with('.')
            && sym.kind() != object::SymbolKind::Section
        {
            out.insert(name.to_owned());
        }
    }
    out
}

#[test]
fn object_has_exactly_the_named_programs() {
    let programs = symbols_in("classifier");
    let expected: BTreeSet<String> = names::ALL_PROGRAMS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        programs, expected,
        "programs in the object vs membrane_common::names"
    );
}

#[test]
fn object_has_exactly_the_named_socket_programs() {
    let programs = symbols_in("cgroup");
    let expected: BTreeSet<String> = names::SOCK_ADDR_PROGRAMS
        .iter()
        .chain(names::SOCK_PROGRAMS.iter())
        .map(|(name, _)| name.to_string())
        .collect();
    assert_eq!(
        programs, expected,
        "cgroup programs vs membrane_common::names"
    );
    // Each program sits in the section of its hook.
    let file = object::File::parse(EBPF_OBJECT).expect("ELF");
    for (name, hook) in names::SOCK_ADDR_PROGRAMS
        .iter()
        .chain(names::SOCK_PROGRAMS.iter())
    {
        let sym = file
            .symbols()
            .find(|s| s.name() == Ok(name))
            .unwrap_or_else(|| panic!("symbol {name}"));
        let section = file
            .section_by_index(sym.section_index().expect("section"))
            .expect("section");
        assert_eq!(
            section.name(),
            Ok(format!("cgroup/{hook}").as_str()),
            "{name}"
        );
    }
}

#[test]
fn object_has_exactly_the_named_maps() {
    let maps = symbols_in("maps");
    let expected: BTreeSet<String> = names::ALL_MAPS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        maps, expected,
        "maps in the object vs membrane_common::names"
    );
}

#[test]
fn pinned_maps_have_the_abi_key_and_value_sizes() {
    require_root();
    let pins = PinGuard::new();
    let datapath = Datapath::load(pins.path(), MapSizes::default()).expect("load");
    // LPM trie keys carry a u32 prefix length before the data. The ring buffer has no key
    // or value; its records are FlowEvents, decoded in the TEST_RUN tests.
    let expected: [(&str, usize, usize); 17] = [
        (
            names::MAP_LB4_NAT,
            size_of::<Lb4NatKey>(),
            size_of::<Lb4Nat>(),
        ),
        (
            names::MAP_LB4_SERVICES,
            size_of::<Lb4ServiceKey>(),
            size_of::<Lb4Service>(),
        ),
        (
            names::MAP_LB4_BACKENDS,
            size_of::<u32>(),
            size_of::<Lb4Backend>(),
        ),
        (
            names::MAP_LB4_SLOTS,
            size_of::<Lb4SlotKey>(),
            size_of::<u32>(),
        ),
        (
            names::MAP_LB4_MAGLEV,
            size_of::<u32>(),
            size_of::<MaglevTable>(),
        ),
        (
            names::MAP_LB4_REVERSE_SK,
            size_of::<Lb4ReverseSkKey>(),
            size_of::<Lb4ReverseSk>(),
        ),
        (
            names::MAP_LB4_AFFINITY,
            size_of::<Lb4AffinityKey>(),
            size_of::<Lb4Affinity>(),
        ),
        (
            names::MAP_LB_AFFINITY_MATCH,
            size_of::<LbAffinityMatchKey>(),
            size_of::<u32>(),
        ),
        (
            names::MAP_LB_CONFIG,
            size_of::<u32>(),
            size_of::<LbConfig>(),
        ),
        (names::MAP_LB_METRICS, size_of::<u32>(), size_of::<u64>()),
        (names::MAP_ABI, size_of::<u32>(), size_of::<u32>()),
        (names::MAP_REVISION, size_of::<u32>(), size_of::<u32>()),
        (
            names::MAP_ENDPOINTS,
            size_of::<u32>(),
            size_of::<EndpointInfo>(),
        ),
        (
            names::MAP_IPCACHE_V4,
            4 + size_of::<IpcacheKeyV4>(),
            size_of::<IpcacheValue>(),
        ),
        (
            names::MAP_POLICY,
            4 + size_of::<PolicyKey>(),
            size_of::<PolicyEntry>(),
        ),
        (names::MAP_CT_V4, size_of::<CtKeyV4>(), size_of::<CtEntry>()),
        (
            names::MAP_METRICS,
            size_of::<u32>(),
            size_of::<MetricsValue>(),
        ),
    ];
    assert!(
        pins.path().join(names::MAP_EVENTS).exists(),
        "events ring buffer pinned by name"
    );
    for (name, key, value) in expected {
        let map = aya::maps::MapData::from_pin(pins.path().join(name))
            .unwrap_or_else(|e| panic!("map {name} is pinned under its ABI name: {e}"));
        let info = map.info().expect("map info");
        assert_eq!(info.key_size() as usize, key, "{name} key size");
        assert_eq!(info.value_size() as usize, value, "{name} value size");
    }
    drop(datapath);
}
