#include "broker/domain/state_file.hpp"

#include <unistd.h>

#include <map>

#include <boost/json.hpp>

#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"

namespace broker {
namespace json = boost::json;
namespace {

json::object identity_json(const fdpass::Identity& id) {
  return {{"kind", id.kind == fdpass::Identity::Kind::block ? "block" : "regular"},
          {"dev", static_cast<std::uint64_t>(id.dev)},
          {"ino", static_cast<std::uint64_t>(id.ino)},
          {"rdev", static_cast<std::uint64_t>(id.rdev)},
          {"diskseq", id.diskseq},
          {"size", id.size}};
}

fdpass::Identity identity_from(const json::object& o) {
  fdpass::Identity id;
  id.kind = o.at("kind").as_string() == "block" ? fdpass::Identity::Kind::block
                                                : fdpass::Identity::Kind::regular;
  id.dev = static_cast<dev_t>(o.at("dev").to_number<std::uint64_t>());
  id.ino = static_cast<ino_t>(o.at("ino").to_number<std::uint64_t>());
  id.rdev = static_cast<dev_t>(o.at("rdev").to_number<std::uint64_t>());
  id.diskseq = o.at("diskseq").to_number<std::uint64_t>();
  id.size = o.at("size").to_number<std::uint64_t>();
  return id;
}

std::string str(const json::object& o, std::string_view k) { return std::string(o.at(k).as_string()); }

json::object spec_json(const lifecycle::DomainSpec& s) {
  return {{"name", s.name},
          {"machine", lifecycle::to_string(s.machine)},
          {"accel", lifecycle::to_string(s.accel)},
          {"memory_mib", s.memory_mib},
          {"vcpus", s.vcpus},
          {"kernel", s.kernel},
          {"initrd", s.initrd},
          {"append", s.append},
          {"pci_slots", s.pci_slots},
          {"paused", s.paused},
          {"firmware", lifecycle::to_string(s.firmware)},
          {"secure_boot", s.secure_boot},
          {"boot_order", json::array(s.boot_order.begin(), s.boot_order.end())},
          {"nvram", s.nvram}};
}

lifecycle::DomainSpec spec_from(const json::object& js) {
  lifecycle::DomainSpec spec;
  spec.name = str(js, "name");
  spec.machine = js.at("machine").as_string() == "none" ? lifecycle::Machine::none
                                                        : lifecycle::Machine::q35;
  spec.memory_mib = js.at("memory_mib").to_number<std::uint32_t>();
  spec.vcpus = js.at("vcpus").to_number<std::uint32_t>();
  spec.kernel = str(js, "kernel");
  spec.initrd = str(js, "initrd");
  spec.append = str(js, "append");
  spec.pci_slots = js.at("pci_slots").to_number<std::uint32_t>();
  spec.paused = js.at("paused").as_bool();
  // Records written before firmware boot existed have none of these: SeaBIOS, no boot order.
  if (auto* f = js.if_contains("firmware"); f && *f == "uefi") spec.firmware = lifecycle::Firmware::uefi;
  if (auto* sb = js.if_contains("secure_boot"); sb && sb->is_bool()) spec.secure_boot = sb->get_bool();
  if (auto* order = js.if_contains("boot_order"); order && order->is_array()) {
    for (const auto& id : order->get_array()) spec.boot_order.emplace_back(id.as_string());
  }
  spec.nvram = js.contains("nvram") ? str(js, "nvram") : std::string();
  return spec;
}

json::object instance_json(const lifecycle::Instance& i) {
  return {{"uid", i.uid},
          {"pid", i.pid},
          {"start_time", i.start_time},
          {"accel", lifecycle::to_string(i.accel)},
          {"qmp", i.qmp_path},
          {"console", i.console_path},
          {"log", i.log_path},
          {"log_pipe_inode", i.log_pipe_inode},
          {"cgroup", i.cgroup_name},
          {"pooled", i.pooled}};
}

void instance_from(const json::object& ji, lifecycle::Instance& inst) {
  inst.uid = ji.at("uid").to_number<uid_t>();
  inst.pid = ji.at("pid").to_number<pid_t>();
  inst.start_time = ji.at("start_time").to_number<unsigned long long>();
  inst.accel = ji.at("accel").as_string() == "kvm" ? lifecycle::Accel::kvm : lifecycle::Accel::tcg;
  inst.qmp_path = str(ji, "qmp");
  inst.console_path = str(ji, "console");
  inst.log_path = str(ji, "log");
  if (const auto* ino = ji.if_contains("log_pipe_inode"); ino != nullptr && ino->is_number()) {
    inst.log_pipe_inode = ino->to_number<unsigned long long>();
  }
  inst.cgroup_name = ji.contains("cgroup") ? str(ji, "cgroup") : std::string();
  if (const auto* pooled = ji.if_contains("pooled"); pooled != nullptr && pooled->is_bool()) {
    inst.pooled = pooled->as_bool();
  }
}

json::object cdrom_json(const CdromState& cd) {
  return {{"id", cd.id}, {"path", cd.path}, {"fdset", cd.fdset}, {"slot", cd.slot},
          {"identity", identity_json(cd.identity)}};
}

CdromState cdrom_from(const json::object& co) {
  CdromState cd;
  cd.id = str(co, "id");
  cd.path = str(co, "path");
  cd.fdset = co.at("fdset").to_number<std::int64_t>();
  cd.slot = str(co, "slot");
  cd.identity = identity_from(co.at("identity").as_object());
  return cd;
}

json::object disk_json(const DiskState& disk) {
  return {{"id", disk.spec.id},
          {"path", disk.spec.path},
          {"format", to_string(disk.spec.format)},
          {"bus", to_string(disk.spec.bus)},
          {"read_only", disk.spec.read_only},
          {"backing", disk.spec.backing},
          {"serial", disk.spec.serial},
          {"fdset", disk.fdset},
          {"backing_fdset", disk.backing_fdset},
          {"slot", disk.slot},
          {"identity", identity_json(disk.identity)}};
}

DiskState disk_from(const json::object& xo) {
  DiskState disk;
  disk.spec.id = str(xo, "id");
  disk.spec.path = str(xo, "path");
  disk.spec.format = xo.at("format").as_string() == "qcow2" ? DiskFormat::qcow2 : DiskFormat::raw;
  disk.spec.bus = xo.at("bus").as_string() == "virtio" ? DiskBus::virtio : DiskBus::scsi;
  disk.spec.read_only = xo.at("read_only").as_bool();
  disk.spec.backing = str(xo, "backing");
  disk.spec.serial = str(xo, "serial");
  disk.fdset = xo.at("fdset").to_number<std::int64_t>();
  disk.backing_fdset = xo.at("backing_fdset").to_number<std::int64_t>();
  disk.slot = str(xo, "slot");
  disk.identity = identity_from(xo.at("identity").as_object());
  return disk;
}

json::object nic_json(const NicState& nic) {
  return {{"id", nic.spec.id}, {"tap", nic.tap}, {"mac", nic.spec.mac}, {"slot", nic.slot}};
}

NicState nic_from(const json::object& no) {
  NicState nic;
  nic.spec.id = str(no, "id");
  nic.tap = str(no, "tap");
  nic.spec.tap = nic.tap;
  nic.spec.mac = str(no, "mac");
  nic.slot = str(no, "slot");
  return nic;
}

template <class T, class F>
json::array array_of(const std::map<std::string, T>& items, F to_json) {
  json::array out;
  for (const auto& [id, item] : items) out.push_back(to_json(item));
  return out;
}

// The devices, root ports, job and VNC listener of a record, onto `d`.
Result<void> devices_from(const json::object& o, Domain& d) {
  for (const auto& c : o.at("cdroms").as_array()) {
    auto cd = cdrom_from(c.as_object());
    d.cdroms[cd.id] = cd;
  }
  for (const auto& x : o.at("disks").as_array()) {
    auto disk = disk_from(x.as_object());
    d.disks[disk.spec.id] = disk;
  }
  for (const auto& n : o.at("nics").as_array()) {
    auto nic = nic_from(n.as_object());
    d.nics[nic.spec.id] = nic;
  }
  for (const auto& kv : o.at("slots").as_object()) {
    d.claim_slot(std::string(kv.key()), std::string(kv.value().as_string()));
  }
  d.scsi_controller = o.at("scsi_controller").as_bool();
  d.scsi_slot = str(o, "scsi_slot");
  if (auto it = o.find("destroying"); it != o.end() && it->value().is_bool()) {
    d.destroying = it->value().get_bool();
  }
  if (auto it = o.find("fdsets_to_close"); it != o.end()) {
    for (const auto& f : it->value().as_array()) {
      const auto& fo = f.as_object();
      d.fdsets_to_close[fo.at("fdset").to_number<std::int64_t>()] = str(fo, "device");
    }
  }
  if (auto it = o.find("job"); it != o.end() && it->value().is_object()) {
    const auto& jo = it->value().as_object();
    json::object args;
    if (auto a = jo.find("args"); a != jo.end() && a->value().is_object()) args = a->value().as_object();
    d.interrupted = Domain::PendingJob{str(jo, "kind"), str(jo, "target"), std::move(args)};
  }
  if (auto it = o.find("vnc"); it != o.end()) {
    const auto& vo = it->value().as_object();
    auto listen = VncListen::parse(str(vo, "listen"), "vnc.listen");
    if (!listen) return listen.error();
    d.vnc = VncState{VncSpec{std::move(*listen)}, str(vo, "address")};
  }
  return {};
}

}  // namespace

json::value state_to_json(const Domain& d) {
  json::object slots;
  for (const auto& [slot, owner] : d.slots()) slots[slot] = owner;
  json::object out{{"version", 1},
                   {"spec", spec_json(d.spec())},
                   {"instance", instance_json(d.instance())},
                   {"state", to_string(d.state())},
                   {"cdroms", array_of(d.cdroms, cdrom_json)},
                   {"disks", array_of(d.disks, disk_json)},
                   {"nics", array_of(d.nics, nic_json)},
                   {"slots", std::move(slots)},
                   {"scsi_controller", d.scsi_controller},
                   {"scsi_slot", d.scsi_slot}};
  if (!d.job().empty()) {
    json::object job{{"kind", d.job()}, {"target", d.job_target()}};
    if (!d.job_args().empty()) job["args"] = d.job_args();
    out["job"] = std::move(job);
  }
  if (!d.fdsets_to_close.empty()) out["fdsets_to_close"] = d.fdsets_to_close_json();
  if (d.destroying) out["destroying"] = true;
  if (d.vnc) {
    out["vnc"] = json::object{{"listen", d.vnc->spec.listen.text()}, {"address", d.vnc->address}};
  }
  return out;
}

Result<std::shared_ptr<Domain>> domain_from_json(const json::value& v) {
  // A record is the broker's own output; json's at()/as_*() throw on any shape it never writes.
  try {
    const auto& o = v.as_object();
    auto d = std::make_shared<Domain>(spec_from(o.at("spec").as_object()));
    d->instance().name = d->name();
    instance_from(o.at("instance").as_object(), d->instance());
    if (auto ok = devices_from(o, *d); !ok) return ok.error();
    return d;
  } catch (const std::exception& e) {
    return Error(make_error_code(errc::internal), std::string("malformed state file: ") + e.what());
  }
}

std::vector<LoadedRecord> load_records(const std::string& dir) {
  std::vector<LoadedRecord> out;
  for (const auto& file : list_dir(dir)) {
    // The temporary file of a record write a crash cut short: the old record (or none) stands.
    if (file.starts_with('.') && file.ends_with(".tmp")) {
      ::unlink((dir + "/" + file).c_str());
      continue;
    }
    if (!file.ends_with(".json") || file.size() < 6) continue;
    auto text = read_small_file(dir + "/" + file);
    if (!text) {
      out.push_back({file, Error(make_error_code(errc::internal), "unreadable domain record")});
      continue;
    }
    std::error_code ec;
    json::value v = json::parse(*text, ec);
    if (ec) {
      out.push_back({file, Error(make_error_code(errc::internal), "domain record is not JSON")});
      continue;
    }
    out.push_back({file, domain_from_json(v)});
  }
  return out;
}

}  // namespace broker
