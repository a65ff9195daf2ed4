// A model of the QEMU objects the flows create (fdsets, named fds, block nodes, devices, netdevs,
// media, the VNC listener), served over the scripted fake QMP peer. It checks what real QEMU
// checks (references exist, names are unique, nodes in use cannot be deleted, fds come with the
// command that takes them) and fails the n-th command on request, so a test can inject a failure
// at every step of a flow and then compare the model with what it was.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include "fake_qmp_server.hpp"
#include "fdpass/unique_fd.hpp"

namespace qbtest {

struct Model {
  std::map<std::int64_t, std::string> fdsets;  // id -> opaque
  std::set<std::string> named_fds;             // getfd names not yet taken
  std::map<std::string, std::vector<std::string>> nodes;  // node -> children it holds
  std::map<std::string, std::string> devices;  // id -> driver
  std::map<std::string, std::string> device_uses;  // id -> node or netdev it holds
  std::set<std::string> netdevs;
  std::map<std::string, std::int64_t> media;  // CD id -> fdset
  bool vnc_listener = false;
  bool operator==(const Model&) const = default;
};

inline std::string describe(const Model& m) {
  std::string s = "fdsets:";
  for (auto& [id, o] : m.fdsets) s += " " + std::to_string(id) + "=" + o;
  s += "\nnamed fds:";
  for (auto& n : m.named_fds) s += " " + n;
  s += "\nnodes:";
  for (auto& [n, c] : m.nodes) s += " " + n;
  s += "\ndevices:";
  for (auto& [id, drv] : m.devices) s += " " + id + "(" + drv + ")";
  s += "\nnetdevs:";
  for (auto& n : m.netdevs) s += " " + n;
  s += "\nmedia:";
  for (auto& [id, set] : m.media) s += " " + id + "=" + std::to_string(set);
  s += m.vnc_listener ? "\nvnc listening" : "\nno vnc";
  return s + "\n";
}

struct Behaviour {
  std::size_t fail_at = std::numeric_limits<std::size_t>::max();  // command index, 0 = first
  std::string fail_class = "GenericError";
  bool ignore_unplug = false;  // device_del never completes (a guest that never acknowledges)
  bool tray_locked = false;    // a guest holds the CD drive open
  // A SCSI device_del takes the device out of qom-list at once but its drive stays held, and
  // DEVICE_DELETED waits, for this many blockdev-del attempts of the drive's node (QEMU
  // finalizing the device a moment after the unplug).
  unsigned late_release = 0;
};

class FakeQemu {
 public:
  explicit FakeQemu(Behaviour b = {}) : b_(std::move(b)) {}

  // The peer's script: handshake, then serve every command until the client closes.
  qbfake::Script script() {
    qbfake::Script s;
    s.handshake().then([this](qbfake::FakeQmpPeer& p) {
      while (auto c = p.read_command()) handle(p, *c);
      return true;
    });
    return s;
  }

  Model model() const {
    std::lock_guard lock(mu_);
    return m_;
  }
  std::size_t commands() const {
    std::lock_guard lock(mu_);
    return names_.size();
  }
  std::vector<std::string> names() const {
    std::lock_guard lock(mu_);
    return names_;
  }
  std::vector<std::string> errors() const {
    std::lock_guard lock(mu_);
    return errors_;
  }
  // fds the model holds for QEMU (they count in this process's fd table).
  std::size_t held() const {
    std::lock_guard lock(mu_);
    return fdset_fds_.size() + named_.size();
  }
  void set_behaviour(Behaviour b) {
    std::lock_guard lock(mu_);
    b_ = std::move(b);
  }

 private:
  using json_object = boost::json::object;

  static std::string str(const json_object& o, std::string_view k) {
    auto* v = o.if_contains(k);
    return v != nullptr && v->is_string() ? std::string(v->get_string()) : std::string();
  }

  void ok(qbfake::FakeQmpPeer& p, const qbfake::Received& c, boost::json::value ret = json_object{}) {
    json_object o{{"return", ret}};
    if (c.id) o["id"] = *c.id;
    p.send_bytes(boost::json::serialize(o) + "\r\n");
  }
  void err(qbfake::FakeQmpPeer& p, const qbfake::Received& c, std::string cls, std::string desc) {
    json_object o{{"error", json_object{{"class", cls}, {"desc", desc}}}};
    if (c.id) o["id"] = *c.id;
    p.send_bytes(boost::json::serialize(o) + "\r\n");
  }
  void event(qbfake::FakeQmpPeer& p, std::string name, json_object data) {
    p.send_bytes(boost::json::serialize(json_object{
                     {"timestamp", json_object{{"seconds", 1}, {"microseconds", 2}}},
                     {"event", name},
                     {"data", data}}) +
                 "\r\n");
  }

  bool node_in_use(const std::string& n) const {
    for (auto& [other, children] : m_.nodes) {
      for (auto& c : children) {
        if (c == n) return true;
      }
    }
    for (auto& [id, used] : m_.device_uses) {
      if (used == n) return true;
    }
    return false;
  }

  static std::int64_t fdset_of(const std::string& filename) {
    const std::string prefix = "/dev/fdset/";
    if (filename.rfind(prefix, 0) != 0) return -1;
    return std::stoll(filename.substr(prefix.size()));
  }

  void handle(qbfake::FakeQmpPeer& p, qbfake::Received& c) {
    std::lock_guard lock(mu_);
    std::size_t index = names_.size();
    names_.push_back(c.name);
    const auto& a = c.args;
    const bool takes_fd = c.name == "add-fd" || c.name == "getfd";
    if (takes_fd != !c.fds.empty()) errors_.push_back(c.name + ": wrong number of fds");
    if (!c.fds.empty() && !c.fd_on_first_byte) errors_.push_back(c.name + ": fd not on first byte");
    for (const auto& [k, v] : a) {
      if (v.is_string() && v.get_string().find('/') != boost::json::string::npos &&
          fdset_of(std::string(v.get_string())) < 0) {
        errors_.push_back(c.name + ": argument " + std::string(k) + " carries a path");
      }
    }
    if (index == b_.fail_at) {
      c.fds.clear();  // QEMU closes a refused fd before it answers
      return err(p, c, b_.fail_class, "injected failure");
    }

    if (c.name == "add-fd") {
      std::int64_t id = next_fdset_++;
      m_.fdsets[id] = str(a, "opaque");
      fdset_fds_[id] = std::move(c.fds.at(0));
      return ok(p, c, json_object{{"fdset-id", id}, {"fd", 100 + id}});
    }
    if (c.name == "remove-fd") {
      auto id = a.at("fdset-id").to_number<std::int64_t>();
      if (!m_.fdsets.erase(id)) return err(p, c, "GenericError", "File descriptor named 'fdset-id:" + std::to_string(id) + "' not found");
      fdset_fds_.erase(id);
      return ok(p, c);
    }
    if (c.name == "getfd") {
      std::string name = str(a, "fdname");
      m_.named_fds.insert(name);
      named_[name] = std::move(c.fds.at(0));
      return ok(p, c);
    }
    if (c.name == "closefd") {
      std::string name = str(a, "fdname");
      if (!m_.named_fds.erase(name)) return err(p, c, "GenericError", "File descriptor named '" + name + "' not found");
      named_.erase(name);
      return ok(p, c);
    }
    if (c.name == "blockdev-add") {
      std::string node = str(a, "node-name");
      if (m_.nodes.contains(node)) return err(p, c, "GenericError", "Duplicate nodes with node-name='" + node + "'");
      std::vector<std::string> children;
      std::string driver = str(a, "driver");
      if (driver == "file") {
        if (!m_.fdsets.contains(fdset_of(str(a, "filename")))) {
          return err(p, c, "GenericError", "Could not open '" + str(a, "filename") + "'");
        }
      } else {
        std::string file = str(a, "file");
        if (!m_.nodes.contains(file)) return err(p, c, "GenericError", "Cannot find device='' nor node-name='" + file + "'");
        children.push_back(file);
        if (driver == "qcow2") {
          auto* bk = a.if_contains("backing");
          if (bk == nullptr) errors_.push_back("qcow2 node without an explicit backing");
          if (bk != nullptr && bk->is_string()) {
            std::string b(bk->get_string());
            if (!m_.nodes.contains(b)) return err(p, c, "GenericError", "Cannot find node-name='" + b + "'");
            children.push_back(b);
          }
        }
      }
      m_.nodes[node] = children;
      return ok(p, c);
    }
    if (c.name == "blockdev-del") {
      std::string node = str(a, "node-name");
      if (!m_.nodes.contains(node)) return err(p, c, "GenericError", "Failed to find node with node-name='" + node + "'");
      if (auto it = lingering_.find(node); it != lingering_.end()) {
        if (it->second.refusals-- > 0) return err(p, c, "GenericError", "Node " + node + " is in use");
        event(p, "DEVICE_DELETED", {{"device", it->second.device}, {"path", "/machine/peripheral/" + it->second.device}});
        lingering_.erase(it);
      }
      if (node_in_use(node)) return err(p, c, "GenericError", "Node " + node + " is in use");
      m_.nodes.erase(node);
      return ok(p, c);
    }
    if (c.name == "device_add") {
      std::string id = str(a, "id");
      std::string driver = str(a, "driver");
      if (m_.devices.contains(id)) return err(p, c, "GenericError", "Duplicate device ID '" + id + "' for device");
      std::string bus = str(a, "bus");
      if (bus == "qb-scsi0.0" && !m_.devices.contains("qb-scsi0")) {
        return err(p, c, "GenericError", "Bus 'qb-scsi0.0' not found");
      }
      std::string uses;
      if (a.contains("drive")) {
        uses = str(a, "drive");
        if (!m_.nodes.contains(uses) || node_in_use(uses)) return err(p, c, "GenericError", "bad drive");
      }
      if (a.contains("netdev")) {
        uses = str(a, "netdev");
        if (!m_.netdevs.contains(uses)) return err(p, c, "GenericError", "bad netdev");
      }
      m_.devices[id] = driver;
      if (!uses.empty()) m_.device_uses[id] = uses;
      return ok(p, c);
    }
    if (c.name == "device_del") {
      std::string id = str(a, "id");
      auto it = m_.devices.find(id);
      if (it == m_.devices.end()) return err(p, c, "DeviceNotFound", "Device '" + id + "' not found");
      bool pci = it->second.rfind("virtio-", 0) == 0;
      ok(p, c);
      if (b_.ignore_unplug && pci) return;
      if (!pci && b_.late_release > 0 && m_.device_uses.contains(id)) {
        lingering_[m_.device_uses[id]] = Lingering{id, static_cast<int>(b_.late_release)};
        m_.devices.erase(it);
        m_.device_uses.erase(id);
        return;
      }
      m_.devices.erase(it);
      m_.device_uses.erase(id);
      if (pci) event(p, "DEVICE_DELETED", {{"path", "/machine/peripheral/" + id + "/virtio-backend"}});
      return event(p, "DEVICE_DELETED", {{"device", id}, {"path", "/machine/peripheral/" + id}});
    }
    if (c.name == "netdev_add") {
      std::string id = str(a, "id");
      if (m_.netdevs.contains(id)) return err(p, c, "GenericError", "Duplicate ID '" + id + "' for netdev");
      std::string fd = str(a, "fd");
      if (!m_.named_fds.erase(fd)) return err(p, c, "GenericError", "File descriptor named '" + fd + "' has not been found");
      named_.erase(fd);
      m_.netdevs.insert(id);
      return ok(p, c);
    }
    if (c.name == "netdev_del") {
      std::string id = str(a, "id");
      if (!m_.netdevs.contains(id)) return err(p, c, "DeviceNotFound", "Device '" + id + "' not found");
      for (auto& [dev, used] : m_.device_uses) {
        if (used == id) return err(p, c, "GenericError", "netdev in use");
      }
      m_.netdevs.erase(id);
      return ok(p, c);
    }
    if (c.name == "blockdev-change-medium" || c.name == "eject") {
      std::string id = str(a, "id");
      if (!m_.devices.contains(id)) return err(p, c, "DeviceNotFound", "Device '" + id + "' not found");
      auto* force = a.if_contains("force");
      if (b_.tray_locked && (force == nullptr || !force->as_bool())) {
        return err(p, c, "GenericError",
                   "Device '" + id + "' is locked and force was not specified, wait for tray to open and try again");
      }
      if (c.name == "eject") {
        m_.media.erase(id);
        event(p, "DEVICE_TRAY_MOVED", {{"device", ""}, {"id", id}, {"tray-open", true}});
        return ok(p, c);
      }
      std::int64_t set = fdset_of(str(a, "filename"));
      if (!m_.fdsets.contains(set)) return err(p, c, "GenericError", "Could not open");
      if (str(a, "read-only-mode") != "read-only") errors_.push_back("CD medium not read-only");
      event(p, "DEVICE_TRAY_MOVED", {{"device", ""}, {"id", id}, {"tray-open", true}});
      m_.media[id] = set;
      event(p, "DEVICE_TRAY_MOVED", {{"device", ""}, {"id", id}, {"tray-open", false}});
      return ok(p, c);
    }
    if (c.name == "display-update") {
      const auto& addrs = a.at("addresses").as_array();
      if (addrs.empty()) {
        m_.vnc_listener = false;
        return ok(p, c);
      }
      std::string name(addrs.at(0).at("str").as_string());
      if (!m_.named_fds.erase(name)) return err(p, c, "GenericError", "File descriptor named '" + name + "' has not been found");
      named_.erase(name);
      m_.vnc_listener = true;
      return ok(p, c);
    }
    if (c.name == "add_client") {
      std::string name = str(a, "fdname");
      if (!m_.named_fds.erase(name)) return err(p, c, "GenericError", "not found");
      named_.erase(name);
      ++clients_;
      return ok(p, c);
    }
    if (c.name == "query-status") return ok(p, c, json_object{{"status", "running"}, {"running", true}});
    err(p, c, "CommandNotFound", "The command " + c.name + " has not been found");
  }

  mutable std::mutex mu_;
  Behaviour b_;
  Model m_;
  struct Lingering {
    std::string device;
    int refusals;
  };
  std::map<std::string, Lingering> lingering_;  // node a deleted device still holds
  std::int64_t next_fdset_ = 0;
  std::map<std::int64_t, fdpass::UniqueFd> fdset_fds_;
  std::map<std::string, fdpass::UniqueFd> named_;
  std::vector<std::string> names_;
  std::vector<std::string> errors_;

 public:
  std::atomic<int> clients_{0};
};

}  // namespace qbtest
