#include "kill_audit.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/json.hpp>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "broker/domain/names.hpp"
#include "support/qemu.hpp"
#include "broker/lifecycle/proc.hpp"
#include "daemon_support.hpp"
#include "http_client.hpp"

namespace qbtest::kill {
namespace fs = std::filesystem;
namespace json = boost::json;
namespace names = broker::names;
using namespace std::chrono_literals;

std::string Findings::text() const {
  std::string out;
  for (const auto& line : lines) out += "  - " + line + "\n";
  return out;
}

namespace {

// ---- Reading JSON, /proc and directories ------------------------------------------------------

// Member `key` of `v`, or null when `v` is no object or lacks it: an answer of the wrong shape
// becomes a finding below instead of an exception.
const json::value& member(const json::value& v, std::string_view key) {
  static const json::value kNull;
  const auto* f = v.is_object() ? v.as_object().if_contains(key) : nullptr;
  return f != nullptr ? *f : kNull;
}

std::string field(const json::value& v, std::string_view key) {
  const auto& f = member(v, key);
  return f.is_string() ? std::string(f.as_string()) : std::string();
}

std::int64_t number(const json::value& v, std::string_view key, std::int64_t missing = -1) {
  const auto& f = member(v, key);
  return f.is_number() ? f.to_number<std::int64_t>() : missing;
}

// `v` as an array, empty when it is none.
const json::array& list(const json::value& v) {
  static const json::array kEmpty;
  return v.is_array() ? v.as_array() : kEmpty;
}

const json::array& array(const json::value& v, std::string_view key) {
  return list(member(v, key));
}

// The names in `dir`, without the errors of a directory that is missing or changes meanwhile.
std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator();
       it.increment(ec)) {
    out.push_back(it->path().filename().string());
  }
  return out;
}

bool is_number(const std::string& s) {
  return !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
}

std::string join(const std::set<std::string>& items) {
  std::string out;
  for (const auto& i : items) out += (out.empty() ? "" : ", ") + i;
  return out.empty() ? "none" : out;
}

std::string comm_of(pid_t pid) {
  auto comm = daemon::slurp("/proc/" + std::to_string(pid) + "/comm");
  if (!comm.empty() && comm.back() == '\n') comm.pop_back();
  return comm;
}

// The cgroup v2 path of `pid` ("0::/qbroker-N/dom-..."), empty when gone.
std::string cgroup_of(pid_t pid) {
  std::istringstream in(daemon::slurp("/proc/" + std::to_string(pid) + "/cgroup"));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("0::", 0) == 0) return line.substr(3);
  }
  return {};
}

// The inodes of the sockets listed in a /proc/net table (column `column`) whose state column
// (when `state` is set) says `state`.
std::set<std::string> socket_inodes(const std::string& table, std::size_t column,
                                    const std::string& state = {}) {
  std::set<std::string> out;
  std::istringstream in(daemon::slurp(table));
  std::string line;
  std::getline(in, line);  // the header
  while (std::getline(in, line)) {
    std::istringstream cols(line);
    std::vector<std::string> c;
    for (std::string w; cols >> w;) c.push_back(w);
    if (c.size() <= column) continue;
    if (!state.empty() && (c.size() <= 3 || c[3] != state)) continue;
    out.insert(c[column]);
  }
  return out;
}

// A domain in findings: its name and run state (QEMU keeps removed fds while paused).
std::string who(const ApiDomain& d) {
  return d.name + " (" + d.state + ")";
}

// ---- The API and the domain record ------------------------------------------------------------

ApiDomain domain_from(const json::value& o) {
  ApiDomain d;
  d.name = field(o, "name");
  d.state = field(o, "state");
  d.job = field(o, "job");
  d.uid = static_cast<uid_t>(number(o, "uid", 0));
  d.pid = static_cast<pid_t>(number(o, "pid", 0));
  const auto& devices = member(o, "devices");
  for (const auto& c : array(devices, "cdroms")) {
    d.cdroms.push_back({field(c, "id"), field(c, "medium")});
  }
  for (const auto& x : array(devices, "disks")) {
    d.disks.push_back(
        {field(x, "id"), field(x, "path"), field(x, "bus"), member(x, "backing").is_string()});
  }
  for (const auto& n : array(devices, "nics")) d.nics.push_back({field(n, "id"), field(n, "tap")});
  if (const auto& vnc = member(devices, "vnc"); vnc.is_object()) d.vnc = field(vnc, "address");
  for (const auto& c : array(devices, "fdsets_to_close")) {
    d.fdsets_to_close[number(c, "fdset")] = field(c, "device");
  }
  return d;
}

// What a domain's record (RUN/domains/NAME.json) holds beyond the API: the instance's cgroup,
// the fdset of each disk and medium, and the root port of each PCI device. A restarted daemon
// believes these, so they must match QEMU too.
struct Record {
  std::string job;  // a job journaled and not yet recorded as ended
  std::string cgroup;
  std::map<std::string, std::int64_t> fdsets;  // fdset opaque -> fdset id
  std::map<std::string, std::string> slots;    // device id -> root port
};

std::optional<Record> read_record(const Layout& l, const std::string& name) {
  std::error_code ec;
  auto v = json::parse(daemon::slurp(l.run + "/domains/" + name + ".json"), ec);
  if (ec || !v.is_object()) return std::nullopt;
  Record r;
  r.job = field(member(v, "job"), "kind");
  r.cgroup = field(member(v, "instance"), "cgroup");
  for (const auto& c : array(v, "cdroms")) {
    if (auto set = number(c, "fdset"); set >= 0)
      r.fdsets[names::fdset_opaque(field(c, "id"))] = set;
  }
  for (const auto& x : array(v, "disks")) {
    const std::string id = field(x, "id");
    r.fdsets[names::fdset_opaque(id)] = number(x, "fdset");
    if (auto set = number(x, "backing_fdset"); set >= 0) {
      r.fdsets[names::fdset_opaque(id + "-backing")] = set;
    }
    r.slots[id] = field(x, "slot");
  }
  for (const auto& n : array(v, "nics")) r.slots[field(n, "id")] = field(n, "slot");
  return r;
}

// The "return" of a QMP command through the API's passthrough; nullopt, and a finding, when the
// daemon or QEMU refuses it.
std::optional<json::value> qmp(const Layout& l, const std::string& domain,
                               const std::string& execute, json::object arguments, Findings& f) {
  json::object body{{"execute", execute}};
  if (!arguments.empty()) body["arguments"] = std::move(arguments);
  auto r = http::call(l.sock, "POST", "/v1/domains/" + domain + "/qmp", json::serialize(body), 15s);
  if (!r || r->status != 200 || !r->json.is_object() || !r->json.as_object().contains("return")) {
    f.add(domain + ": " + execute + " through the API failed: " +
          (r ? std::to_string(r->status) + " " + r->body : std::string("no answer")));
    return std::nullopt;
  }
  return r->json.at("return");
}

// ---- What QEMU holds --------------------------------------------------------------------------

struct Fdset {
  std::int64_t id = -1;
  std::vector<std::string> opaques;  // one per fd
  std::vector<std::string> fds;      // QEMU's fd numbers
};

struct QemuView {
  std::map<std::string, std::string> peripherals;  // id -> QOM type, from qom-list
  std::set<std::string> nodes;                     // query-named-block-nodes
  std::map<std::string, std::string> media;        // query-block: device id -> file ("" empty)
  std::vector<Fdset> fdsets;
  std::map<std::string, std::string> pci_port;  // device id -> the root port it sits on
  std::set<std::string> netdevs;                // from "info network"
  std::optional<std::string> vnc_port;          // query-vnc, when a listener is set
};

// A query-block "qdev": the id itself ("cd0") or a QOM path below it
// ("/machine/peripheral/d1/virtio-backend").
std::string device_of(std::string qdev) {
  const std::string prefix = "/machine/peripheral/";
  if (qdev.rfind(prefix, 0) != 0) return qdev;
  qdev.erase(0, prefix.size());
  return qdev.substr(0, qdev.find('/'));
}

// Netdev ids from HMP "info network": a NIC's line ("n0: index=0,type=nic,...") is followed by
// its netdev's (" \ qb-net-n0: index=0,type=tap,..."); a netdev without a NIC stands alone.
std::set<std::string> netdevs_of(const std::string& info) {
  std::set<std::string> out;
  std::istringstream in(info);
  for (std::string line; std::getline(in, line);) {
    auto start = line.find_first_not_of(" \\\t");
    auto colon = line.find(':');
    if (start == std::string::npos || colon == std::string::npos || colon < start) continue;
    if (line.find("type=nic") != std::string::npos) continue;
    out.insert(line.substr(start, colon - start));
  }
  return out;
}

void read_pci(const json::value& buses, QemuView& q) {
  for (const auto& bus : list(buses)) {
    for (const auto& dev : array(bus, "devices")) {
      const std::string id = field(dev, "qdev_id");
      const auto& bridge = member(dev, "pci_bridge");
      if (!bridge.is_object()) {
        if (!id.empty()) q.pci_port[id] = "pcie.0";
        continue;
      }
      for (const auto& below : array(bridge, "devices")) q.pci_port[field(below, "qdev_id")] = id;
    }
  }
}

std::optional<QemuView> query_qemu(const Layout& l, const std::string& name, Findings& f) {
  QemuView q;
  auto peripherals = qmp(l, name, "qom-list", {{"path", "/machine/peripheral"}}, f);
  auto nodes = qmp(l, name, "query-named-block-nodes", {}, f);
  auto blocks = qmp(l, name, "query-block", {}, f);
  auto fdsets = qmp(l, name, "query-fdsets", {}, f);
  auto pci = qmp(l, name, "query-pci", {}, f);
  auto network = qmp(l, name, "human-monitor-command", {{"command-line", "info network"}}, f);
  auto vnc = qmp(l, name, "query-vnc", {}, f);
  if (!peripherals || !nodes || !blocks || !fdsets || !pci || !network || !vnc) return std::nullopt;
  for (const auto& p : list(*peripherals)) {
    std::string type = field(p, "type");
    if (type.rfind("child<", 0) != 0) continue;
    q.peripherals[field(p, "name")] = type.substr(6, type.size() - 7);
  }
  for (const auto& n : list(*nodes)) q.nodes.insert(field(n, "node-name"));
  for (const auto& b : list(*blocks)) {
    q.media[device_of(field(b, "qdev"))] = field(member(b, "inserted"), "file");
  }
  for (const auto& s : list(*fdsets)) {
    Fdset set{number(s, "fdset-id"), {}, {}};
    for (const auto& fd : array(s, "fds")) {
      set.opaques.push_back(field(fd, "opaque"));
      set.fds.push_back(std::to_string(number(fd, "fd")));
    }
    q.fdsets.push_back(std::move(set));
  }
  read_pci(*pci, q);
  q.netdevs = netdevs_of(network->is_string() ? std::string(network->as_string()) : "");
  if (const auto& on = member(*vnc, "enabled"); on.is_bool() && on.as_bool()) {
    q.vnc_port = field(*vnc, "service");
  }
  return q;
}

// ---- One domain: the API against QEMU ---------------------------------------------------------

// qom-list: one device per listed disk (of its bus), CD drive and NIC, and nothing else but the
// root ports and the SCSI controller.
void check_peripherals(const ApiDomain& d, const QemuView& q, Findings& f) {
  std::map<std::string, std::string> want;  // id -> QOM type
  for (const auto& x : d.disks) want[x.id] = x.bus == "virtio" ? "virtio-blk-pci" : "scsi-hd";
  for (const auto& c : d.cdroms) want[c.id] = "scsi-cd";
  for (const auto& n : d.nics) want[n.id] = "virtio-net-pci";
  for (const auto& [id, type] : want) {
    auto it = q.peripherals.find(id);
    if (it == q.peripherals.end()) {
      f.add(who(d) + ": the API lists " + id + " (" + type + ") but QEMU has no such device");
    } else if (it->second != type) {
      f.add(who(d) + ": the API lists " + id + " as " + type + " but QEMU's is a " + it->second);
    }
  }
  for (const auto& [id, type] : q.peripherals) {
    if (want.contains(id)) continue;
    if (type == "pcie-root-port" && id.rfind("rp", 0) == 0) continue;
    if (type == "virtio-scsi-pci" && id == names::kScsiController) continue;
    f.add(who(d) + ": QEMU has device " + id + " (" + type + ") that the API does not list");
  }
}

// Block nodes and media: every qb- node belongs to a listed disk, each disk has its nodes, and
// each CD drive reads the medium the API reports, from the fdset its record names.
void check_block(const ApiDomain& d, const Record& r, const QemuView& q, Findings& f) {
  std::set<std::string> allowed;
  for (const auto& x : d.disks) {
    for (const auto& node : names::block_nodes(x.id)) allowed.insert(node);
    std::vector<std::string> need = {names::format_node(x.id), names::file_node(x.id)};
    if (x.backing)
      need.insert(need.end(), {names::backing_node(x.id), names::backing_file_node(x.id)});
    for (const auto& node : need) {
      if (!q.nodes.contains(node)) f.add(who(d) + ": disk " + x.id + " has no block node " + node);
    }
  }
  for (const auto& node : q.nodes) {
    if (node.rfind(names::kReserved, 0) == 0 && !allowed.contains(node)) {
      f.add(who(d) + ": QEMU has block node " + node + " that no listed disk owns");
    }
  }
  for (const auto& c : d.cdroms) {
    auto it = q.media.find(c.id);
    if (it == q.media.end()) {
      f.add(who(d) + ": query-block has no drive " + c.id);
    } else if (c.medium.empty() != it->second.empty()) {
      f.add(who(d) + ": the API says " + c.id + " holds " +
            (c.medium.empty() ? std::string("no medium") : c.medium) + ", QEMU's drive holds " +
            (it->second.empty() ? std::string("no medium") : it->second));
    } else if (!c.medium.empty()) {
      const auto set = r.fdsets.find(names::fdset_opaque(c.id));
      const std::string recorded =
          set == r.fdsets.end() ? "(none)" : "/dev/fdset/" + std::to_string(set->second);
      if (recorded != it->second) {
        f.add(who(d) + ": " + c.id + " reads " + it->second + ", its record says " + recorded);
      }
    }
  }
  std::set<std::string> known;
  for (const auto& x : d.disks) known.insert(x.id);
  for (const auto& c : d.cdroms) known.insert(c.id);
  for (const auto& [id, file] : q.media) {
    if (!known.contains(id))
      f.add(who(d) + ": query-block lists drive " + id + " (" + file + ") the API does not");
  }
}

// Fdsets: exactly one per current disk (two with a backing file) and per inserted medium, each
// named by its device's opaque, and the ones the record names are those QEMU has. Besides those
// only the ones the API lists as still to close (removed while the VM did not run), each of the
// device it names.
void check_fdsets(const ApiDomain& d, const Record& r, const QemuView& q, Findings& f) {
  std::map<std::string, int> want;
  for (const auto& x : d.disks) {
    ++want[names::fdset_opaque(x.id)];
    if (x.backing) ++want[names::fdset_opaque(x.id + "-backing")];
  }
  for (const auto& c : d.cdroms) {
    if (!c.medium.empty()) ++want[names::fdset_opaque(c.id)];
  }
  std::map<std::string, int> have;
  std::map<std::int64_t, std::set<std::string>> by_id;
  for (const auto& set : q.fdsets) {
    std::set<std::string> opaques(set.opaques.begin(), set.opaques.end());
    by_id[set.id] = opaques;
    if (d.fdsets_to_close.contains(set.id)) continue;
    for (const auto& o : opaques) ++have[o];
  }
  for (const auto& [id, device] : d.fdsets_to_close) {
    if (!by_id.contains(id) || by_id.at(id) != std::set<std::string>{names::fdset_opaque(device)}) {
      f.add(who(d) + ": the API lists fdset " + std::to_string(id) + " of " + device +
            " as still to close, QEMU's fdset " + std::to_string(id) + " holds " +
            (by_id.contains(id) ? join(by_id.at(id)) : std::string("nothing (no such fdset)")));
    }
  }
  for (const auto& [opaque, n] : have) {
    auto w = want.contains(opaque) ? want.at(opaque) : 0;
    if (n != w) {
      f.add(who(d) + ": QEMU has " + std::to_string(n) + " fdset(s) of '" + opaque +
            "', the current devices need " + std::to_string(w));
    }
  }
  for (const auto& [opaque, n] : want) {
    if (!have.contains(opaque)) f.add(who(d) + ": QEMU has no fdset of '" + opaque + "'");
  }
  for (const auto& [opaque, id] : r.fdsets) {
    if (!by_id.contains(id) || !by_id.at(id).contains(opaque)) {
      f.add(who(d) + ": the record names fdset " + std::to_string(id) + " for '" + opaque +
            "', QEMU's fdset " + std::to_string(id) + " holds " +
            (by_id.contains(id) ? join(by_id.at(id)) : std::string("nothing (no such fdset)")));
    }
  }
}

// PCI and netdevs: every device on a root port but the SCSI controller is a listed virtio disk
// or NIC, on the port its record names; each NIC has its netdev and no netdev is left without.
void check_pci_and_netdevs(const ApiDomain& d, const Record& r, const QemuView& q, Findings& f) {
  std::set<std::string> want;
  for (const auto& x : d.disks) {
    if (x.bus == "virtio") want.insert(x.id);
  }
  for (const auto& n : d.nics) want.insert(n.id);
  for (const auto& id : want) {
    auto it = q.pci_port.find(id);
    auto slot = r.slots.contains(id) ? r.slots.at(id) : std::string("(none)");
    if (it == q.pci_port.end()) {
      f.add(who(d) + ": query-pci has no device " + id);
    } else if (it->second != slot) {
      f.add(who(d) + ": " + id + " sits on " + it->second + ", its record says " + slot);
    }
  }
  for (const auto& [id, port] : q.pci_port) {
    if (id.empty() || want.contains(id) || id == names::kScsiController) continue;
    if (id.rfind("rp", 0) == 0 && port == "pcie.0") continue;
    f.add(who(d) + ": query-pci has device " + id + " on " + port + " that the API does not list");
  }
  std::set<std::string> netdevs;
  for (const auto& n : d.nics) netdevs.insert(names::netdev_id(n.id));
  if (netdevs != q.netdevs) {
    f.add(who(d) + ": netdevs for the listed NICs: " + join(netdevs) +
          "; QEMU has: " + join(q.netdevs));
  }
}

void check_vnc(const ApiDomain& d, const QemuView& q, Findings& f) {
  if (d.vnc.has_value() != q.vnc_port.has_value()) {
    f.add(who(d) + ": the API's VNC listener is " + d.vnc.value_or("none") + ", QEMU's is " +
          (q.vnc_port ? "on port " + *q.vnc_port : std::string("none")));
    return;
  }
  if (d.vnc && d.vnc->substr(d.vnc->rfind(':') + 1) != *q.vnc_port) {
    f.add(who(d) + ": the API's VNC listener is " + *d.vnc + ", QEMU listens on port " +
          *q.vnc_port);
  }
}

// The fds QEMU holds: each image fd belongs to a current disk or medium (two each: the fdset's fd
// and the protocol node's dup of it) or to an fdset the API lists as still to close, one tap fd
// per NIC, one host TCP listener with VNC, and besides those only its QMP and console sockets,
// its log pipe as stdout and stderr, and anonymous inodes.
void check_qemu_fds(const Layout& l, const ApiDomain& d, const QemuView& q, Findings& f) {
  std::set<std::string> closing;  // the fds of the fdsets the API lists as still to close
  for (const auto& set : q.fdsets) {
    if (d.fdsets_to_close.contains(set.id)) closing.insert(set.fds.begin(), set.fds.end());
  }
  std::map<std::string, int> need;
  for (const auto& x : d.disks) need[x.path] += 2;
  for (const auto& c : d.cdroms) {
    if (!c.medium.empty()) need[c.medium] += 2;
  }
  const auto listeners = socket_inodes("/proc/self/net/tcp", 9, "0A");
  const auto listeners6 = socket_inodes("/proc/self/net/tcp6", 9, "0A");
  const auto unix_sockets = socket_inodes("/proc/self/net/unix", 6);
  std::map<std::string, int> held;
  std::multiset<std::string> taps;  // the interface of each tun fd (fdinfo "iff:")
  int tcp = 0, unix_count = 0;
  const std::string fd_dir = "/proc/" + std::to_string(d.pid) + "/fd";
  for (const auto& fd : entries(fd_dir)) {
    std::error_code ec;
    const std::string target = fs::read_symlink(fd_dir + "/" + fd, ec).string();
    if (ec || closing.contains(fd)) continue;
    const std::string inode =
        target.rfind("socket:[", 0) == 0 ? target.substr(8, target.size() - 9) : "";
    if (target.rfind(l.images + "/", 0) == 0) {
      ++held[target];
    } else if (target == "/dev/net/tun") {
      std::istringstream info(daemon::slurp("/proc/" + std::to_string(d.pid) + "/fdinfo/" + fd));
      std::string iff = "(none)";
      for (std::string line; std::getline(info, line);) {
        if (line.rfind("iff:\t", 0) == 0) iff = line.substr(5);
      }
      taps.insert(iff);
    } else if (listeners.contains(inode) || listeners6.contains(inode)) {
      ++tcp;
    } else if (unix_sockets.contains(inode)) {
      ++unix_count;
    } else if (target.rfind("anon_inode:", 0) != 0 && target != "/dev/null" &&
               !qbtest::is_anonymous_memory(fd_dir + "/" + fd) &&
               !((fd == "1" || fd == "2") && target.rfind("pipe:[", 0) == 0)) {  // the log pipe
      f.add(who(d) + ": QEMU holds fd " + fd + " -> " + target + ", which no current device needs");
    }
  }
  for (const auto& [image, n] : held) {
    auto want = need.contains(image) ? need.at(image) : 0;
    if (n != want) {
      f.add(who(d) + ": QEMU holds " + std::to_string(n) + " fd(s) of " + image +
            ", its current devices need " + std::to_string(want));
    }
  }
  for (const auto& [image, n] : need) {
    if (!held.contains(image))
      f.add(who(d) + ": QEMU holds no fd of " + image + ", which a current device uses");
  }
  std::multiset<std::string> nic_taps;
  for (const auto& n : d.nics) nic_taps.insert(n.tap);
  if (taps != nic_taps) {
    f.add(who(d) + ": QEMU holds tap fds of " + join({taps.begin(), taps.end()}) + " (" +
          std::to_string(taps.size()) + "), the listed NICs use " +
          join({nic_taps.begin(), nic_taps.end()}));
  }
  if (tcp != (d.vnc ? 1 : 0)) {
    f.add(who(d) + ": QEMU holds " + std::to_string(tcp) + " host TCP listener(s), VNC is " +
          d.vnc.value_or("unset"));
  }
  // The QMP and console listeners and the daemon's one QMP connection.
  if (unix_count > 3)
    f.add(who(d) + ": QEMU holds " + std::to_string(unix_count) +
          " Unix sockets, at most 3 expected");
}

// The live view of the domain (GET /v1/domains/NAME) agrees with the list and with QEMU's run
// state.
void check_live(const Layout& l, const ApiDomain& d, Findings& f) {
  auto r = http::call(l.sock, "GET", "/v1/domains/" + d.name, {}, 15s);
  if (!r || r->status != 200 || !r->json.is_object()) {
    f.add(who(d) + ": GET /v1/domains/" + d.name +
          " failed: " + (r ? std::to_string(r->status) + " " + r->body : std::string("no answer")));
    return;
  }
  const ApiDomain live = domain_from(r->json);
  if (live.pid != d.pid || live.uid != d.uid || live.state != d.state) {
    f.add(who(d) + ": GET of the domain and the list disagree (" + r->body + ")");
  }
  const std::string status = field(r->json, "qemu_status");
  const bool agree = (d.state == "running" && status == "running") ||
                     (d.state == "paused" && status != "running" && !status.empty());
  if (!agree) f.add(who(d) + ": the API's state is " + d.state + ", QEMU's status is " + status);
}

void check_domain(const Layout& l, const ApiDomain& d, const Record& r, Findings& f) {
  check_live(l, d, f);
  auto q = query_qemu(l, d.name, f);
  if (!q) return;
  check_peripherals(d, *q, f);
  check_block(d, r, *q, f);
  check_fdsets(d, r, *q, f);
  check_pci_and_netdevs(d, r, *q, f);
  check_vnc(d, *q, f);
  check_qemu_fds(l, d, *q, f);
}

// ---- Processes --------------------------------------------------------------------------------

// Each listed domain's QEMU is alive, runs as its uid, in its cgroup.
void check_listed_qemus(const Layout& l, const std::vector<ApiDomain>& ds,
                        const std::map<std::string, Record>& records, Findings& f) {
  for (const auto& d : ds) {
    const auto status = daemon::slurp("/proc/" + std::to_string(d.pid) + "/status");
    const auto uid_at = status.find("\nUid:\t");
    const auto state_at = status.find("\nState:\t");
    if (uid_at == std::string::npos ||
        (state_at != std::string::npos && status[state_at + 8] == 'Z')) {
      f.add(who(d) + ": its QEMU pid " + std::to_string(d.pid) + " is not alive");
      continue;
    }
    const auto uid = std::strtoul(status.c_str() + uid_at + 6, nullptr, 10);
    if (uid != d.uid) {
      f.add(who(d) + ": pid " + std::to_string(d.pid) + " runs as uid " + std::to_string(uid) +
            ", the API says " + std::to_string(d.uid));
    }
    if (comm_of(d.pid).rfind("qemu-system", 0) != 0) {
      f.add(who(d) + ": pid " + std::to_string(d.pid) + " is " + comm_of(d.pid) + ", not a QEMU");
    }
    if (l.cgroup_base.empty() || !records.contains(d.name)) continue;
    const std::string& mine = records.at(d.name).cgroup;
    const std::string in = cgroup_of(d.pid);
    if (mine.empty() || !in.ends_with("/" + mine)) {
      f.add(who(d) + ": its QEMU is in cgroup " + in + ", its record names " +
            (mine.empty() ? "none" : mine));
    }
  }
}

// Live processes in the uid range that no listed domain accounts for: a uid no domain has, or a
// process outside its domain's cgroup.
std::vector<std::string> strays(const Layout& l, const std::vector<ApiDomain>& ds,
                                const std::map<std::string, Record>& records) {
  std::vector<std::string> out;
  for (uid_t uid = l.base; uid < l.base + l.uids; ++uid) {
    const ApiDomain* owner = nullptr;
    for (const auto& d : ds) owner = d.uid == uid ? &d : owner;
    for (const auto& p : broker::lifecycle::processes_of_uid("/proc", uid)) {
      if (p.zombie) continue;
      if (owner != nullptr && p.pid == owner->pid) continue;
      if (owner != nullptr && records.contains(owner->name) &&
          !records.at(owner->name).cgroup.empty() &&
          cgroup_of(p.pid).ends_with("/" + records.at(owner->name).cgroup)) {
        continue;
      }
      out.push_back("pid " + std::to_string(p.pid) + " (" + comm_of(p.pid) + ", uids " + p.uids +
                    ") runs in the uid range but " +
                    (owner ? "outside domain " + owner->name + "'s cgroup"
                           : std::string("no listed domain has uid ") + std::to_string(uid)));
    }
  }
  return out;
}

void check_processes(const Layout& l, pid_t daemon_pid, const std::vector<ApiDomain>& ds,
                     const std::map<std::string, Record>& records, Findings& f) {
  check_listed_qemus(l, ds, records, f);
  // A uid sweep's reaper child may be on its way out; anything else stays.
  std::vector<std::string> left;
  daemon::wait_for(
      [&] {
        reap_children_except(daemon_pid);
        left = strays(l, ds, records);
        return left.empty();
      },
      2s);
  for (auto& s : left) f.add(std::move(s));
}

// ---- Files, cgroups, mounts and taps ----------------------------------------------------------

// Every entry of `dir` is `<key><suffix>` for a key in `owners`, and every owner has one.
void check_named(const std::string& dir, const std::string& suffix,
                 const std::set<std::string>& owners, const std::string& what, Findings& f) {
  std::set<std::string> seen;
  for (const auto& e : entries(dir)) {
    const bool fits = e.size() > suffix.size() && e.ends_with(suffix);
    const std::string key = fits ? e.substr(0, e.size() - suffix.size()) : e;
    if (!fits || !owners.contains(key)) {
      f.add(what + " " + dir + "/" + e + " belongs to no listed domain");
      continue;
    }
    seen.insert(key);
  }
  for (const auto& o : owners) {
    if (!seen.contains(o)) f.add("the " + what + " of " + o + " is missing from " + dir);
  }
}

void check_files(const Layout& l, const std::vector<ApiDomain>& ds, Findings& f) {
  std::set<std::string> uids, domains;
  for (const auto& d : ds) {
    uids.insert(std::to_string(d.uid));
    domains.insert(d.name);
  }
  check_named(l.state + "/uids", "", uids, "uid record", f);
  check_named(l.run + "/domains", ".json", domains, "domain record", f);
  check_named(l.run + "/qmp", ".sock", domains, "QMP socket", f);
  check_named(l.run + "/console", ".sock", domains, "console socket", f);
  for (const auto& e : entries(l.run + "/jail")) f.add("the jail mount point holds " + e);
}

// Every cgroup below the daemon's subtree is a listed domain's, or empty of processes.
void check_cgroups(const Layout& l, const std::vector<ApiDomain>& ds,
                   const std::map<std::string, Record>& records, Findings& f) {
  if (l.cgroup_base.empty()) return;
  std::set<std::string> owned;
  for (const auto& d : ds) {
    if (!records.contains(d.name)) continue;
    const auto& cg = records.at(d.name).cgroup;
    owned.insert(cg);
    if (!cg.empty() && !fs::is_directory(l.cgroup_base + "/" + cg)) {
      f.add(who(d) + ": its cgroup " + cg + " does not exist");
    }
  }
  for (const auto& e : entries(l.cgroup_base)) {
    const std::string path = l.cgroup_base + "/" + e;
    if (!fs::is_directory(path) || owned.contains(e)) continue;
    auto procs = daemon::slurp(path + "/cgroup.procs");
    std::replace(procs.begin(), procs.end(), '\n', ' ');
    if (!procs.empty())
      f.add("cgroup " + e + " belongs to no listed domain and holds pids " + procs);
  }
}

void check_mounts(const Layout& l, Findings& f) {
  std::istringstream in(daemon::slurp("/proc/self/mountinfo"));
  for (std::string line; std::getline(in, line);) {
    std::istringstream cols(line);
    std::string id, parent, dev, root, point;
    cols >> id >> parent >> dev >> root >> point;
    if (point.rfind(l.root, 0) == 0)
      f.add("mount at " + point + " below the test's directory: " + line);
  }
}

// Who holds the tap `name` open: tun fds say their interface in fdinfo ("iff:\tNAME").
std::string tap_holders(const std::string& name) {
  std::set<std::string> out;
  for (const auto& pid : entries("/proc")) {
    if (!is_number(pid)) continue;
    const std::string dir = "/proc/" + pid;
    for (const auto& fd : entries(dir + "/fd")) {
      std::error_code ec;
      if (fs::read_symlink(dir + "/fd/" + fd, ec).string() != "/dev/net/tun") continue;
      if (daemon::slurp(dir + "/fdinfo/" + fd).find("iff:\t" + name + "\n") == std::string::npos)
        continue;
      const auto p = static_cast<pid_t>(std::stol(pid));
      out.insert("pid " + pid + " (" + comm_of(p) + ")");
    }
  }
  return out.empty() ? "no process" : join(out);
}

// Taps named by the harness that no listed NIC has. A tap goes when its last fd closes, a
// moment after its holder died, so they get two seconds to go.
void check_taps(const Layout& l, const std::vector<ApiDomain>& ds, Findings& f) {
  std::set<std::string> owned;
  for (const auto& d : ds) {
    for (const auto& n : d.nics) owned.insert(n.tap);
  }
  std::set<std::string> present, unowned;
  daemon::wait_for(
      [&] {
        present.clear();
        unowned.clear();
        for (const auto& e : entries("/sys/class/net")) {
          if (e.rfind(l.tap_prefix, 0) != 0) continue;
          present.insert(e);
          if (!owned.contains(e)) unowned.insert(e);
        }
        return unowned.empty();
      },
      2s);
  for (const auto& t : unowned)
    f.add("tap " + t + " belongs to no listed NIC; held by " + tap_holders(t));
  for (const auto& t : owned) {
    if (!present.contains(t)) f.add("the tap " + t + " of a listed NIC does not exist");
  }
}

// Waits until no listed domain has a job or is in transit, and every record says so too (a job
// slot is given back before the job's end is written); the last list.
std::optional<std::vector<ApiDomain>> settle(const Layout& l, std::chrono::milliseconds timeout,
                                             Findings& f) {
  std::optional<std::vector<ApiDomain>> listed;
  // Fdsets still to close go once the VM runs again.
  auto busy = [&l](const ApiDomain& d) {
    auto r = read_record(l, d.name);
    return !d.job.empty() || (d.state != "running" && d.state != "paused") ||
           (r && !r->job.empty()) || (d.state == "running" && !d.fdsets_to_close.empty());
  };
  auto quiet = [&] {
    listed = list_domains(l.sock);
    return listed && std::none_of(listed->begin(), listed->end(), busy);
  };
  if (daemon::wait_for(quiet, timeout) || !listed) return listed;
  const std::string after = " after " + std::to_string(timeout.count()) + " ms";
  for (const auto& d : *listed) {
    if (!d.job.empty()) f.add(who(d) + ": still in job " + d.job + after);
    if (d.state != "running" && d.state != "paused") f.add(who(d) + ": state " + d.state + after);
    if (auto r = read_record(l, d.name); r && !r->job.empty() && d.job.empty()) {
      f.add(who(d) + ": no job is listed, but its record journals " + r->job + after);
    }
    if (d.state == "running" && !d.fdsets_to_close.empty()) {
      f.add(who(d) + ": runs, but lists " + std::to_string(d.fdsets_to_close.size()) +
            " fdset(s) still to close" + after);
    }
  }
  return listed;
}

}  // namespace

std::optional<std::vector<ApiDomain>> list_domains(const std::string& sock) {
  auto r = http::call(sock, "GET", "/v1/domains", {}, 10s);
  if (!r || r->status != 200 || !r->json.is_object()) return std::nullopt;
  std::vector<ApiDomain> out;
  for (const auto& d : array(r->json, "domains")) out.push_back(domain_from(d));
  return out;
}

void reap_children_except(pid_t keep) {
  const pid_t me = ::getpid();
  for (const auto& name : entries("/proc")) {
    if (!is_number(name)) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(name));
    if (pid == keep) continue;
    const auto stat = daemon::slurp("/proc/" + name + "/stat");
    const auto close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 1));
    char state = 0;
    long ppid = 0;
    rest >> state >> ppid;
    if (state == 'Z' && ppid == me) ::waitpid(pid, nullptr, WNOHANG);
  }
}

AuditResult audit(const Layout& l, pid_t daemon_pid, std::chrono::milliseconds settle_for) {
  AuditResult out;
  Findings& f = out.findings;
  auto listed = settle(l, settle_for, f);
  if (!listed) {
    f.add("GET /v1/domains does not answer");
    return out;
  }
  reap_children_except(daemon_pid);
  const std::size_t fds_before = daemon::non_socket_fds(daemon_pid);
  std::map<std::string, Record> records;
  for (const auto& d : *listed) {
    auto r = read_record(l, d.name);
    if (!r) f.add(who(d) + ": no readable record " + l.run + "/domains/" + d.name + ".json");
    records[d.name] = r.value_or(Record{});
  }
  check_processes(l, daemon_pid, *listed, records, f);
  for (const auto& d : *listed) check_domain(l, d, records.at(d.name), f);
  check_files(l, *listed, f);
  check_cgroups(l, *listed, records, f);
  check_mounts(l, f);
  check_taps(l, *listed, f);
  // Only growth is a leak; a record write or a reaped QEMU may close one meanwhile.
  daemon::wait_for(
      [&] {
        out.daemon_fds = daemon::non_socket_fds(daemon_pid);
        return out.daemon_fds <= fds_before;
      },
      1s);
  if (out.daemon_fds > fds_before) {
    f.add("qbrokerd's non-socket fds went from " + std::to_string(fds_before) + " to " +
          std::to_string(out.daemon_fds) + " across the audit's queries");
  }
  out.domains = std::move(*listed);
  return out;
}

Findings audit_empty(const Layout& l, pid_t daemon_pid) {
  Findings f;
  auto listed = list_domains(l.sock);
  if (!listed) f.add("GET /v1/domains does not answer");
  if (listed && !listed->empty()) f.add(std::to_string(listed->size()) + " domain(s) still listed");
  // Zombies too: one not yet reaped keeps its cgroup busy, and the daemon removes cgroups when
  // it stops. QEMUs whose daemon died are this process's children; the daemon reaps its own.
  std::vector<std::string> left;
  daemon::wait_for(
      [&] {
        reap_children_except(daemon_pid);
        left = strays(l, {}, {});
        for (uid_t uid = l.base; uid < l.base + l.uids; ++uid) {
          if (!broker::lifecycle::processes_of_uid("/proc", uid).empty()) return false;
        }
        return left.empty();
      },
      5s);
  for (auto& s : left) f.add(std::move(s));
  for (const auto& top : {l.state, l.run}) {
    std::error_code ec;
    for (auto it = fs::recursive_directory_iterator(top, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (!it->is_directory()) f.add("left behind: " + it->path().string());
    }
  }
  for (const auto& e : entries(l.run + "/jail")) f.add("the jail mount point holds " + e);
  check_cgroups(l, {}, {}, f);
  check_mounts(l, f);
  check_taps(l, {}, f);
  return f;
}

}  // namespace qbtest::kill
