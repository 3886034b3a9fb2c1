//! Weft's transparent capture: loads the socket-level programs, attaches them to the cgroup v2
//! hierarchy with pinned bpf_links (so capture outlives the loader and a new loader takes over
//! in place), and enrolls pods by network namespace.

mod error;
mod inbound;
mod mounts;
mod netns;
mod pins;
mod preflight;
mod sys;

use std::fs::File;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapInfo, PerCpuArray, SockHash};
use aya::programs::Program;
use aya::{Ebpf, EbpfLoader};
use aya_obj::generated::bpf_attach_type;
use redirect_common::{
    Cidr, ClientKey, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, OriginalDst, PodSettings, STAT_LOST,
    STAT_REFUSED_UNRECORDED, STAT_UNFILED, SockKey,
};
use tracing::{info, warn};

pub use error::RedirectError;
pub use inbound::InboundListeners;
pub use mounts::{bpffs_mount, cgroup2_mount};
pub use netns::{netns_cookie, netns_cookie_of, run_in_netns, socket_netns_cookie};
pub use pins::{default_pin_dir, uninstall, uninstall_from};
pub use preflight::{MIN_KERNEL, kernel_version, preflight};
pub use redirect_common::{DEFAULT_TUNNEL_MARK, OUTBOUND_PORT};

use inbound::{INBOUND_MAP, address_key};
use pins::{PinLayout, detach_and_remove_pin, remove_pin};

/// The compiled programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect"));

/// Every map of the object, pinned so a restarted loader keeps enrollments and in-flight
/// original destinations.
const MAPS: [&str; 8] = [
    "ENROLLED",
    "EXCLUDED_CGROUPS",
    "ORIGINAL_DST",
    "BY_CLIENT",
    "SOCKETS",
    "FAST_PATH_STATS",
    "CAPTURE_STATS",
    INBOUND_MAP,
];

/// The programs attached to the cgroup, each through one pinned link named after it.
const CGROUP_PROGRAMS: [(&str, bpf_attach_type); 5] = [
    ("connect4", bpf_attach_type::BPF_CGROUP_INET4_CONNECT),
    ("connect6", bpf_attach_type::BPF_CGROUP_INET6_CONNECT),
    ("file_original_dst", bpf_attach_type::BPF_CGROUP_SOCK_OPS),
    (
        "answer_original_dst",
        bpf_attach_type::BPF_CGROUP_GETSOCKOPT,
    ),
    (
        "forget_original_dst",
        bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE,
    ),
];
const FAST_PATH_PROGRAM: &str = "fast_path";
const INBOUND_PROGRAM: &str = "inbound";

/// How capture is installed.
#[derive(Clone, Debug)]
pub struct Options {
    /// Move bytes between an application and the tunnel with sockops + sk_msg, skipping the
    /// loopback TCP stack (see `weft-bench capture`).
    pub fast_path: bool,
    /// Where links and maps are pinned; default `<bpffs>/weft` ([`default_pin_dir`]).
    pub pin_dir: Option<PathBuf>,
    /// The `SO_MARK` of the tunnel's sockets, which are never captured (the tunnel's
    /// `--socket-mark`); 0: none, the cgroup exclusion alone.
    pub tunnel_mark: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fast_path: false,
            pin_dir: None,
            tunnel_mark: DEFAULT_TUNNEL_MARK,
        }
    }
}

/// Reads a socket mark as given on a command line: decimal or `0x` hexadecimal.
pub fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not a socket mark (decimal or 0x hexadecimal)"))
}

/// What the capture programs counted since they were installed, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureCounts {
    /// Connects refused because their original destination could not be recorded.
    pub refused_unrecorded: u64,
    /// Connections whose original destination could not be filed under the client address.
    pub unfiled: u64,
    /// Connections the tunnel accepted on its outbound port and found no record for.
    pub lost: u64,
}

/// Destinations a pod leaves out of capture: ports and address ranges (IPv4 or IPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub ports: Vec<u16>,
    /// Ranges as (network address, prefix length in that family's bits).
    pub cidrs: Vec<(IpAddr, u8)>,
}

impl Exclusions {
    fn to_settings(&self) -> Result<PodSettings, RedirectError> {
        if self.ports.len() > MAX_EXCLUDED_PORTS || self.cidrs.len() > MAX_EXCLUDED_CIDRS {
            return Err(RedirectError::TooManyExclusions {
                ports: self.ports.len(),
                cidrs: self.cidrs.len(),
            });
        }
        let mut settings = PodSettings {
            outbound_port: OUTBOUND_PORT,
            excluded_port_count: self.ports.len() as u8,
            excluded_cidr_count: self.cidrs.len() as u8,
            _pad: [0; 4],
            excluded_ports: [0; MAX_EXCLUDED_PORTS],
            excluded_cidrs: [Cidr::default(); MAX_EXCLUDED_CIDRS],
        };
        settings.excluded_ports[..self.ports.len()].copy_from_slice(&self.ports);
        for (slot, (addr, prefix_len)) in settings.excluded_cidrs.iter_mut().zip(&self.cidrs) {
            let (family_bits, offset) = if addr.is_ipv4() { (32, 96) } else { (128, 0) };
            if *prefix_len > family_bits {
                return Err(RedirectError::BadCidr(format!("{addr}/{prefix_len}")));
            }
            *slot = Cidr {
                addr: address_key(*addr),
                prefix_len: prefix_len + offset,
                _pad: [0; 7],
            };
        }
        Ok(settings)
    }
}

/// Installed capture. Everything it attaches is pinned: dropping this changes nothing for
/// live traffic; [`Redirect::uninstall`] removes it.
pub struct Redirect {
    /// The loaded programs (the inbound one is attached per pod at enrollment).
    ebpf: Ebpf,
    pins: PinLayout,
    adopted: bool,
    enrolled: HashMap<MapData, u64, PodSettings>,
    excluded_cgroups: HashMap<MapData, u64, u8>,
    by_client: HashMap<MapData, ClientKey, OriginalDst>,
    sockets: SockHash<MapData, SockKey>,
    fast_path_stats: PerCpuArray<MapData, u64>,
    capture_stats: PerCpuArray<MapData, u64>,
    /// The inbound listener map, opened at the first registration.
    inbound: Option<InboundListeners>,
}

impl Redirect {
    /// Loads the programs and attaches them to the cgroup at `cgroup` (normally the root of
    /// the cgroup v2 hierarchy, so every pod is covered), pinning links and maps under the pin
    /// directory. If an earlier loader pinned capture there, takes it over instead: the same
    /// maps (enrollments and in-flight connections kept) and the same links, whose programs
    /// are swapped in place, so capture has no gap and nothing is attached twice.
    pub fn install(cgroup: &Path, options: &Options) -> Result<Self, RedirectError> {
        preflight()?;
        let root = match &options.pin_dir {
            Some(dir) => dir.clone(),
            None => default_pin_dir()?,
        };
        let fresh = !root.exists();
        let installed = Self::install_at(&root, cgroup, options);
        if installed.is_err() && fresh {
            // Leave nothing half-installed behind; a takeover that fails keeps what it found.
            let _ = uninstall(&root);
        }
        installed
    }

    fn install_at(root: &Path, cgroup: &Path, options: &Options) -> Result<Self, RedirectError> {
        let pins = PinLayout::prepare(root)?;
        check_pinned_maps(&pins)?;

        let fast_path = u8::from(options.fast_path);
        let map_paths: Vec<(&str, PathBuf)> =
            MAPS.iter().map(|name| (*name, pins.map(name))).collect();
        let mut loader = EbpfLoader::new();
        loader.override_global("FAST_PATH", &fast_path, true);
        loader.override_global("TUNNEL_MARK", &options.tunnel_mark, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS).map_err(RedirectError::Load)?;
        let enrolled =
            HashMap::try_from(take_map(&mut ebpf, "ENROLLED")?).map_err(RedirectError::Map)?;
        let excluded_cgroups = HashMap::try_from(take_map(&mut ebpf, "EXCLUDED_CGROUPS")?)
            .map_err(RedirectError::Map)?;
        let by_client =
            HashMap::try_from(take_map(&mut ebpf, "BY_CLIENT")?).map_err(RedirectError::Map)?;
        let sockets: SockHash<MapData, SockKey> =
            SockHash::try_from(take_map(&mut ebpf, "SOCKETS")?).map_err(RedirectError::Map)?;
        let fast_path_stats = PerCpuArray::try_from(take_map(&mut ebpf, "FAST_PATH_STATS")?)
            .map_err(RedirectError::Map)?;
        let capture_stats = PerCpuArray::try_from(take_map(&mut ebpf, "CAPTURE_STATS")?)
            .map_err(RedirectError::Map)?;
        for (name, _) in CGROUP_PROGRAMS {
            load_program(&mut ebpf, name)?;
        }
        load_program(&mut ebpf, FAST_PATH_PROGRAM)?;
        load_program(&mut ebpf, INBOUND_PROGRAM)?;

        let cgroup_dir = File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut adopted = false;
        for (name, attach_type) in CGROUP_PROGRAMS {
            let program = program_fd(&ebpf, name)?;
            adopted |= attach_or_adopt(&pins.link(name), name, program, || {
                sys::link_create(program, cgroup_dir.as_fd(), attach_type)
            })?;
        }
        let fast_path_pin = pins.link(FAST_PATH_PROGRAM);
        if options.fast_path {
            let program = program_fd(&ebpf, FAST_PATH_PROGRAM)?;
            attach_or_adopt(&fast_path_pin, FAST_PATH_PROGRAM, program, || {
                sys::link_create(
                    program,
                    sockets.fd().as_fd(),
                    bpf_attach_type::BPF_SK_MSG_VERDICT,
                )
            })?;
        } else {
            detach_and_remove_pin(&fast_path_pin)?;
        }
        // Pods enrolled through an earlier loader: their inbound links run this build's program.
        let inbound = program_fd(&ebpf, INBOUND_PROGRAM)?;
        for (cookie, pin) in pins.inbound_links()? {
            let updated =
                sys::obj_get(&pin).and_then(|link| sys::link_update(link.as_fd(), inbound));
            if let Err(error) = updated {
                // Its network namespace is gone (the link is defunct): so is the pod.
                warn!(netns_cookie = cookie, %error, "dropping the inbound link of a vanished pod");
                remove_pin(&pin)?;
            }
        }
        if adopted {
            info!(pins = %root.display(), "took over pinned capture");
        } else {
            info!(pins = %root.display(), cgroup = %cgroup.display(), "capture installed");
        }
        Ok(Redirect {
            ebpf,
            pins,
            adopted,
            enrolled,
            excluded_cgroups,
            by_client,
            sockets,
            fast_path_stats,
            capture_stats,
            inbound: None,
        })
    }

    /// Whether [`Redirect::install`] took over capture pinned by an earlier loader.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Where this capture's links and maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        self.pins.root()
    }

    /// Removes this capture: every link (detaching its program), map and pin.
    pub fn uninstall(self) -> Result<(), RedirectError> {
        let root = self.pins.root().to_owned();
        drop(self);
        uninstall(&root).map(drop)
    }

    /// Captures the TCP connections of the pod whose network namespace is `netns` (an open
    /// `/run/netns/<name>` or `/proc/<pid>/ns/net`): its connects go to the tunnel's outbound
    /// listener, and connections reaching it from outside the pod go to the tunnel's plaintext
    /// inbound listener, both in the pod's namespace. Enrolling again replaces the pod's
    /// exclusions. Returns the namespace's cookie, the pod's key in every capture map.
    pub fn enroll(
        &mut self,
        netns: impl AsFd,
        exclusions: &Exclusions,
    ) -> Result<u64, RedirectError> {
        let settings = exclusions.to_settings()?;
        let cookie = netns_cookie_of(netns.as_fd())?;
        let pin = self.pins.inbound_link(cookie);
        if !pin.exists() {
            let program = program_fd(&self.ebpf, INBOUND_PROGRAM)?;
            let link = sys::link_create(program, netns.as_fd(), bpf_attach_type::BPF_SK_LOOKUP)
                .map_err(|source| link_error("attach", INBOUND_PROGRAM, source))?;
            sys::obj_pin(link.as_fd(), &pin)
                .map_err(|source| RedirectError::Pin { path: pin, source })?;
        }
        self.enrolled
            .insert(cookie, settings, 0)
            .map_err(RedirectError::Map)?;
        Ok(cookie)
    }

    /// Steers connections from outside the pod to `ip` (one of its addresses) to `listener`,
    /// the tunnel's plaintext inbound listener, once it is shown to be a listening TCP socket
    /// of the pod's own network namespace (`netns_cookie`) and of `ip`'s family: whoever hands
    /// the socket over cannot make capture deliver a pod's traffic anywhere else.
    pub fn register_inbound(
        &mut self,
        ip: IpAddr,
        listener: BorrowedFd<'_>,
        netns_cookie: u64,
    ) -> Result<(), RedirectError> {
        check_listener(ip, listener, netns_cookie)?;
        let map = match &mut self.inbound {
            Some(map) => map,
            None => self
                .inbound
                .insert(InboundListeners::open(self.pins.root())?),
        };
        map.register(ip, &listener)
    }

    /// Stops capturing a pod's connections, both ways; the next connection goes straight.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        match self.enrolled.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(RedirectError::Map(e)),
        }
        // Detached at once: the sk_lookup program does not consult the enrolled map, so until
        // the link goes, connections from outside would still be steered (or refused).
        detach_and_remove_pin(&self.pins.inbound_link(netns_cookie))
    }

    /// Never captures connections made by processes in the cgroup at `path` (a directory of the
    /// cgroup v2 hierarchy) or below it: the tunnel's, on top of its socket mark. Returns the
    /// cgroup's id.
    pub fn exclude_cgroup(&mut self, path: &Path) -> Result<u64, RedirectError> {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(path)
            .map_err(|source| RedirectError::Cgroup {
                path: path.to_owned(),
                source,
            })?
            .ino();
        self.excluded_cgroups
            .insert(id, 1, 0)
            .map_err(RedirectError::Map)?;
        Ok(id)
    }

    /// The netns cookies of the enrolled pods.
    pub fn enrolled(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Sockets of a namespace currently on the fast path (both ends of each app-tunnel leg).
    pub fn fast_path_sockets(&self, netns_cookie: u64) -> usize {
        self.sockets
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.netns_cookie == netns_cookie)
            .count()
    }

    /// Messages the fast path has handed straight to the peer socket, and messages it left on
    /// the normal path (no peer in the socket hash), summed over CPUs.
    pub fn fast_path_counts(&self) -> Result<(u64, u64), RedirectError> {
        let stats = &self.fast_path_stats;
        Ok((sum_per_cpu(stats, 0)?, sum_per_cpu(stats, 1)?))
    }

    /// What the capture programs counted (refusals, unfiled and lost records), summed over
    /// CPUs, since capture was first installed under this pin directory.
    pub fn capture_counts(&self) -> Result<CaptureCounts, RedirectError> {
        let stats = &self.capture_stats;
        Ok(CaptureCounts {
            refused_unrecorded: sum_per_cpu(stats, STAT_REFUSED_UNRECORDED)?,
            unfiled: sum_per_cpu(stats, STAT_UNFILED)?,
            lost: sum_per_cpu(stats, STAT_LOST)?,
        })
    }

    /// The original destination of a captured connection, by the client's namespace and
    /// address (what the tunnel sees as the peer of the accepted socket). The same answer
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` gives on that socket.
    pub fn original_destination(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
    ) -> Result<Option<SocketAddr>, RedirectError> {
        let key = ClientKey {
            netns_cookie,
            addr: address_key(client.ip()),
            port: client.port(),
            _pad: [0; 6],
        };
        match self.by_client.get(&key, 0) {
            Ok(dst) => Ok(Some(to_socket_addr(&dst))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(RedirectError::Map(e)),
        }
    }
}

/// Refuses a socket that is not a listening TCP socket of `ip`'s family in the namespace
/// `netns_cookie`.
fn check_listener(
    ip: IpAddr,
    listener: BorrowedFd<'_>,
    netns_cookie: u64,
) -> Result<(), RedirectError> {
    use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname};
    use nix::sys::socket::{getsockopt, sockopt};
    let refuse = |reason: String| RedirectError::BadListener { ip, reason };
    let io = |e: nix::Error| refuse(e.to_string());
    if getsockopt(&listener, sockopt::SockType).map_err(io)? != SockType::Stream
        || !getsockopt(&listener, sockopt::AcceptConn).map_err(io)?
    {
        return Err(refuse("not a listening TCP socket".into()));
    }
    let family = getsockname::<SockaddrStorage>(listener.as_raw_fd())
        .map_err(io)?
        .family();
    let wanted = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    if family != Some(wanted) {
        return Err(refuse(format!("the socket is of family {family:?}")));
    }
    let cookie = socket_netns_cookie(listener).map_err(|e| refuse(e.to_string()))?;
    if cookie != netns_cookie {
        return Err(refuse(format!(
            "the socket is in network namespace {cookie}, the pod's is {netns_cookie}"
        )));
    }
    Ok(())
}

/// Counter `slot` of a per-CPU array, summed over CPUs.
fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, slot: u32) -> Result<u64, RedirectError> {
    let values = array.get(&slot, 0).map_err(RedirectError::Map)?;
    Ok(values.iter().sum())
}

/// Takes map `name` out of the loaded object.
fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, RedirectError> {
    ebpf.take_map(name).ok_or(RedirectError::Missing(name))
}

/// Loads (verifies) program `name` of the object.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), RedirectError> {
    let loaded = match ebpf.program_mut(name).ok_or(RedirectError::Missing(name))? {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        _ => return Err(RedirectError::Missing(name)),
    };
    loaded.map_err(RedirectError::Program)
}

/// The descriptor of loaded program `name`.
fn program_fd<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<BorrowedFd<'a>, RedirectError> {
    let program = ebpf.program(name).ok_or(RedirectError::Missing(name))?;
    Ok(program.fd().map_err(RedirectError::Program)?.as_fd())
}

fn link_error(action: &'static str, what: &str, source: std::io::Error) -> RedirectError {
    RedirectError::Link {
        action,
        what: what.to_owned(),
        source,
    }
}

/// Makes the link pinned at `pin` run `program`: swapped in place if the pin exists (true),
/// otherwise created with `create` and pinned (false).
fn attach_or_adopt(
    pin: &Path,
    name: &str,
    program: BorrowedFd<'_>,
    create: impl FnOnce() -> std::io::Result<std::os::fd::OwnedFd>,
) -> Result<bool, RedirectError> {
    if pin.exists() {
        let link =
            sys::obj_get(pin).map_err(|source| link_error("open the pinned", name, source))?;
        sys::link_update(link.as_fd(), program)
            .map_err(|source| link_error("update the pinned", name, source))?;
        return Ok(true);
    }
    let link = create().map_err(|source| link_error("attach", name, source))?;
    sys::obj_pin(link.as_fd(), pin).map_err(|source| RedirectError::Pin {
        path: pin.to_owned(),
        source,
    })?;
    Ok(false)
}

/// Refuses pinned maps whose layout differs from this build's (an older, incompatible Weft):
/// reusing them would make the programs misread every entry.
fn check_pinned_maps(pins: &PinLayout) -> Result<(), RedirectError> {
    let object =
        aya_obj::Object::parse(PROGRAMS).map_err(|e| RedirectError::Object(e.to_string()))?;
    for name in MAPS {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(RedirectError::Map)?;
        let wanted = object.maps.get(name).ok_or(RedirectError::Missing(name))?;
        let found_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let found = (
            found_type,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let wanted = (
            wanted.map_type(),
            wanted.key_size(),
            wanted.value_size(),
            wanted.max_entries(),
        );
        if found != wanted {
            return Err(RedirectError::IncompatiblePin {
                path,
                name,
                found: format!("{found:?}"),
                wanted: format!("{wanted:?}"),
            });
        }
    }
    Ok(())
}

fn to_socket_addr(dst: &OriginalDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(dst.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, dst.port)),
        None => SocketAddr::from((v6, dst.port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_read_in_decimal_or_hex() {
        assert_eq!(parse_mark("0x539"), Ok(0x539));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert_eq!(parse_mark("0"), Ok(0));
        assert!(
            parse_mark("mark")
                .unwrap_err()
                .contains("not a socket mark")
        );
    }

    #[test]
    fn exclusions_fill_the_kernel_settings_and_refuse_too_many() {
        let e = Exclusions {
            ports: vec![5432, 6379],
            cidrs: vec![
                ("10.96.0.0".parse().unwrap(), 12),
                ("fd00:10::".parse().unwrap(), 32),
            ],
        };
        let s = e.to_settings().unwrap();
        assert_eq!((s.excluded_port_count, s.excluded_cidr_count), (2, 2));
        assert_eq!(&s.excluded_ports[..2], &[5432, 6379]);
        let v4 = s.excluded_cidrs[0];
        assert_eq!((&v4.addr[12..], v4.prefix_len), (&[10, 96, 0, 0][..], 108));
        let inside = address_key("10.111.2.3".parse().unwrap());
        let outside = address_key("10.112.0.1".parse().unwrap());
        assert!(v4.contains(&inside) && !v4.contains(&outside));
        let v6 = s.excluded_cidrs[1];
        assert_eq!(v6.prefix_len, 32);
        assert!(v6.contains(&address_key("fd00:10:ff::1".parse().unwrap())));
        assert!(!v6.contains(&address_key("fd00:11::1".parse().unwrap())));
        assert!(
            !v6.contains(&inside),
            "an IPv6 range never holds an IPv4 address"
        );
        let too_many = Exclusions {
            ports: (1..=9).collect(),
            cidrs: vec![],
        };
        assert!(
            too_many
                .to_settings()
                .unwrap_err()
                .to_string()
                .contains("at most 8 ports")
        );
        let bad = Exclusions {
            ports: vec![],
            cidrs: vec![("10.0.0.0".parse().unwrap(), 33)],
        };
        assert!(
            bad.to_settings()
                .unwrap_err()
                .to_string()
                .contains("10.0.0.0/33")
        );
    }
}
