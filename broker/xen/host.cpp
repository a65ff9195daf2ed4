#include "broker/xen/host.hpp"

#include <sys/stat.h>

#include <boost/json/array.hpp>

#include <algorithm>
#include <cerrno>

namespace broker::xen {
namespace {

Error not_tracked(std::uint32_t domid) {
  return Error(std::make_error_code(std::errc::no_such_process),
               "domid " + std::to_string(domid) + " has no device model here");
}

}  // namespace

Host::Host(Store& xs, DomainList& domains, lifecycle::Launcher& launcher, lifecycle::UidPool& uids,
           const UserDb& users, HostConfig config)
    : xs_(xs), domains_(domains), launcher_(launcher), uids_(uids), users_(users),
      config_(std::move(config)) {}

std::string Host::node_dir(std::uint32_t domid) const {
  return config_.node_dir + "/" + std::to_string(domid);
}

bool Host::in_range(uid_t uid) const {
  const auto& r = uids_.range();
  return uid > r.base && uid < r.base + r.count;
}

Result<const DeviceModel*> Host::start(lifecycle::DomainSpec spec, std::uint32_t domid,
                                       GuestType type, lifecycle::FdHandover* cold,
                                       const std::vector<std::string>& extra_args) {
  if (models_.contains(domid)) {
    Error e(std::make_error_code(std::errc::file_exists),
            "domid " + std::to_string(domid) + " already has a device model");
    e.field = "xen.domid";
    return e;
  }
  auto uid = device_model_uid(users_, domid, config_.allow_shared);
  if (!uid) return uid.error();
  if (uid->shared != uids_.is_shared() || (!uid->shared && !in_range(uid->uid))) {
    return Error(std::make_error_code(std::errc::invalid_argument),
                 "the device-model uid " + std::to_string(uid->uid) + " of domid " +
                     std::to_string(domid) + " is not in this broker's uid range");
  }
  // The kill uid first: from here on, whoever finds the record kills by it.
  DeviceModelRecord record{domid, type, uid->shared ? std::nullopt : std::optional<uid_t>(uid->uid)};
  if (auto ok = record_device_model(xs_, record); !ok) return ok.error();
  auto undo_record = [&] { (void)remove_record(xs_, domid); };

  if (::mkdir(config_.node_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    undo_record();
    return make_error({errno, std::system_category()}, "creating " + config_.node_dir);
  }
  auto nodes = make_device_nodes(config_.dev_dir, node_dir(domid), uid->uid);
  if (!nodes) {
    undo_record();
    return nodes.error();
  }
  spec.kernel.clear();
  spec.initrd.clear();
  spec.xen = lifecycle::XenPart{domid, type == GuestType::pv, uid->uid, std::move(*nodes)};
  auto inst = launcher_.start(spec, cold, extra_args);
  if (!inst) {
    remove_device_nodes(node_dir(domid));
    undo_record();
    return inst.error();
  }
  if (auto ok = record_pid(xs_, domid, inst->pid); !ok) {
    (void)launcher_.destroy(*inst);
    remove_device_nodes(node_dir(domid));
    undo_record();
    return ok.error();
  }
  DeviceModel dm{domid, type, uid->uid, uid->shared, std::move(*inst)};
  return &models_.insert_or_assign(domid, std::move(dm)).first->second;
}

Result<void> Host::seal(std::uint32_t domid) {
  if (!models_.contains(domid)) {
    return not_tracked(domid);
  }
  if (auto ok = seal_device_nodes(node_dir(domid)); !ok) return ok;
  models_.at(domid).sealed = true;
  return {};
}

boost::json::object to_json(const DeviceModel& dm) {
  boost::json::object o{{"domid", dm.domid},
                        {"type", to_string(dm.type)},
                        {"uid", dm.uid},
                        {"shared_uid", dm.shared},
                        {"started_by", dm.ours ? "qbroker" : "libxl"},
                        {"sealed", dm.sealed}};
  if (dm.instance) {
    o["pid"] = dm.instance->pid;
  } else if (dm.recorded_pid) {
    o["pid"] = *dm.recorded_pid;
  }
  boost::json::array backends;
  for (const auto& b : dm.backends) {
    backends.push_back(boost::json::object{
        {"devid", b.devid},
        {"path", b.path},
        {"node", b.disk.node},
        {"physical_device", physical_device(b.disk.rdev)},
        {"diskseq", diskseq_hex(b.disk.diskseq)},
        {"state", b.state},
        {"held", b.held()}});
  }
  o["backends"] = std::move(backends);
  return o;
}

Result<lifecycle::KillReport> Host::stop(std::uint32_t domid) {
  auto it = models_.find(domid);
  if (it == models_.end()) {
    return not_tracked(domid);
  }
  DeviceModel& dm = it->second;
  Result<lifecycle::KillReport> killed = lifecycle::KillReport{};
  if (dm.instance) {
    killed = launcher_.destroy(*dm.instance);  // releases the uid once nothing runs under it
  } else {
    killed = uids_.reaper().kill_uid(dm.uid);
    if (killed && dm.ours) (void)uids_.release(dm.uid);
  }
  if (!killed) return killed.error();
  if (!dm.instance) {
    // An adopted device model's cgroup is known to no Instance: it goes with every other domain
    // cgroup no live instance holds (the launcher never sweeps one a start is making).
    std::vector<const lifecycle::Instance*> live;
    for (const auto& [id, model] : models_) {
      if (model.instance) live.push_back(&*model.instance);
    }
    launcher_.sweep_cgroups(live);
  }
  detach_backends(dm);
  remove_device_nodes(node_dir(domid));
  if (dm.ours) {
    if (auto ok = remove_record(xs_, domid); !ok) return ok.error();
  } else {
    reaped_for_libxl_[domid] = dm.recorded_pid;
  }
  models_.erase(it);
  return killed;
}

Result<const Backend*> Host::attach_disk(std::uint32_t domid, std::uint32_t devid,
                                         fdpass::BorrowedFd image, const std::string& path,
                                         bool read_only) {
  auto it = models_.find(domid);
  if (it == models_.end()) {
    return not_tracked(domid);
  }
  for (const auto& b : it->second.backends) {
    if (b.devid == devid) {
      Error e(std::make_error_code(std::errc::file_exists),
              "domid " + std::to_string(domid) + " has a disk " + std::to_string(devid) + " already");
      e.field = "devid";
      return e;
    }
  }
  Backend b;
  b.devid = devid;
  b.path = backend_path(domid, devid);
  auto disk = open_backend_disk(image, path, read_only);
  if (!disk) return disk.error();
  b.disk = std::move(*disk);
  if (auto ok = publish_backend_disk(xs_, b.disk, b.path); !ok) return ok.error();
  if (auto ok = xs_.watch(b.path + "/state", kBackendToken); !ok) {
    (void)xs_.rm(b.path);
    return ok.error();
  }
  it->second.backends.push_back(std::move(b));
  return &it->second.backends.back();
}

void Host::backend_changed(const std::string& path) {
  for (auto& [domid, dm] : models_) {
    for (auto& b : dm.backends) {
      if (path != b.path + "/state") continue;
      auto state = xs_.read(path);
      if (!state) continue;  // read again at the next event
      b.state = state->value_or("");
      // blkback holds the device now: the broker's hold has done its work.
      if (b.state == kConnected) b.disk.fd.reset();
    }
  }
}

void Host::detach_backends(DeviceModel& dm) {
  for (auto& b : dm.backends) {
    (void)xs_.unwatch(b.path + "/state", kBackendToken);
    if (dm.ours) (void)xs_.rm(b.path);
  }
  dm.backends.clear();  // closes every fd still held
}

Result<std::vector<std::uint32_t>> Host::on_events(std::vector<Error>* failed) {
  auto events = xs_.take_events();
  if (!events) return events.error();
  bool released_any = false;
  for (const auto& ev : *events) {
    released_any = released_any || (ev.token == kReleaseToken && ev.path == "@releaseDomain");
    if (ev.token == kBackendToken) backend_changed(ev.path);
  }
  if (!released_any) return std::vector<std::uint32_t>();
  return recover(failed);
}

Result<std::vector<std::uint32_t>> Host::recover(std::vector<Error>* failed) {
  auto recorded = recorded_domids(xs_);
  if (!recorded) return recorded.error();
  auto now = domains_.list();
  if (!now) return now.error();
  std::erase_if(reaped_for_libxl_, [&](const auto& reaped) {
    return std::find(recorded->begin(), recorded->end(), reaped.first) == recorded->end();
  });
  for (auto domid : *recorded) {
    if (models_.contains(domid)) continue;
    auto r = read_record(xs_, domid);
    if (!r) {
      if (failed != nullptr) failed->push_back(r.error());
      continue;
    }
    if (auto it = reaped_for_libxl_.find(domid); it != reaped_for_libxl_.end()) {
      if (it->second == r->pid) continue;  // the one already killed
      reaped_for_libxl_.erase(it);
    }
    // Only what this broker's convention would have started: a kill uid in its range.
    if (!r->kill_uid || !in_range(*r->kill_uid)) continue;
    DeviceModel dm;
    dm.domid = domid;
    dm.uid = *r->kill_uid;
    dm.ours = uids_.in_use().contains(dm.uid);
    dm.recorded_pid = r->pid;
    models_.emplace(domid, std::move(dm));
  }
  std::vector<std::uint32_t> tracked;
  for (const auto& [domid, dm] : models_) tracked.push_back(domid);
  std::vector<std::uint32_t> reaped;
  for (auto domid : released(tracked, *now)) {
    auto r = stop(domid);
    if (r) {
      reaped.push_back(domid);
    } else if (failed != nullptr) {
      failed->push_back(r.error());
    }
  }
  return reaped;
}

}  // namespace broker::xen
