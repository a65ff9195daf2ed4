#include "broker/xen/device_model.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>

namespace broker::xen {
namespace {

std::string id(std::uint32_t domid) { return std::to_string(domid); }

Error invalid(std::string message) {
  return Error(std::make_error_code(std::errc::invalid_argument), std::move(message));
}

}  // namespace

namespace paths {
std::string domain(std::uint32_t d) { return "/local/domain/" + id(d); }
std::string kill_uid(std::uint32_t d) { return domain(d) + "/image/device-model-kill-uid"; }
std::string dm_pid(std::uint32_t d) { return domain(d) + "/image/device-model-pid"; }
std::string dm_dir(std::uint32_t d) { return "/local/domain/0/device-model/" + id(d); }
std::string dm_state(std::uint32_t d) { return dm_dir(d) + "/state"; }
std::string libxl(std::uint32_t d) { return "/libxl/" + id(d); }
std::string dm_version(std::uint32_t d) { return libxl(d) + "/dm-version"; }
std::string type(std::uint32_t d) { return libxl(d) + "/type"; }
}  // namespace paths

Result<void> record_device_model(Store& xs, const DeviceModelRecord& r) {
  auto written = xs.transact([&](Tx tx) -> Result<void> {
    if (r.kill_uid) {
      if (auto ok = xs.write(paths::kill_uid(r.domid), std::to_string(*r.kill_uid), tx); !ok) {
        return ok;
      }
    }
    if (auto ok = xs.write(paths::dm_version(r.domid), "qemu_xen", tx); !ok) return ok;
    if (auto ok = xs.write(paths::type(r.domid), std::string(to_string(r.type)), tx); !ok) {
      return ok;
    }
    if (auto ok = xs.mkdir(paths::dm_dir(r.domid), tx); !ok) return ok;
    // Owned by dom0; the guest's domain may read its device model's state, nothing more.
    return xs.set_perms(paths::dm_dir(r.domid), {{'n', 0}, {'r', r.domid}}, tx);
  });
  if (!written) return written.error();
  return {};
}

Result<void> record_pid(Store& xs, std::uint32_t domid, pid_t pid) {
  return xs.write(paths::dm_pid(domid), std::to_string(pid));
}

Result<Recorded> read_record(Store& xs, std::uint32_t domid) {
  Recorded out;
  auto uid = xs.read(paths::kill_uid(domid));
  if (!uid) return uid.error();
  if (*uid) {
    auto v = parse_uid(**uid);
    if (!v || *v == 0) {
      return invalid(paths::kill_uid(domid) + " holds \"" + **uid + "\", not a uid above 0");
    }
    out.kill_uid = *v;
  }
  auto pid = xs.read(paths::dm_pid(domid));
  if (!pid) return pid.error();
  if (*pid) out.pid = parse_pid(**pid);
  auto version = xs.read(paths::dm_version(domid));
  if (!version) return version.error();
  out.dm_version = *version;
  return out;
}

Result<std::vector<std::uint32_t>> recorded_domids(Store& xs) {
  auto names = xs.directory("/libxl");
  if (!names) return names.error();
  std::vector<std::uint32_t> out;
  for (const auto& n : *names) {
    if (auto d = parse_domid(n)) out.push_back(*d);
  }
  return out;
}

Result<void> remove_record(Store& xs, std::uint32_t domid) {
  auto removed = xs.transact([&](Tx tx) -> Result<void> {
    for (const auto& p : {paths::kill_uid(domid), paths::dm_pid(domid), paths::dm_dir(domid),
                          paths::libxl(domid)}) {
      if (auto ok = xs.rm(p, tx); !ok) return ok;
    }
    return {};
  });
  if (!removed) return removed.error();
  return {};
}

Result<std::vector<std::pair<std::string, std::string>>> make_device_nodes(
    const std::string& host_dir, const std::string& dir, uid_t uid) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return make_error({errno, std::system_category()}, "creating " + dir);
  }
  std::vector<std::pair<std::string, std::string>> out;
  for (const char* name : kDeviceNodes) {
    struct stat st {};
    const std::string host = host_dir + "/" + name;
    if (::stat(host.c_str(), &st) != 0 || !S_ISCHR(st.st_mode)) continue;
    const std::string copy = dir + "/" + name;
    ::unlink(copy.c_str());
    if (::mknod(copy.c_str(), S_IFCHR | 0600, st.st_rdev) != 0 ||
        ::chown(copy.c_str(), uid, uid) != 0) {
      auto e = make_error({errno, std::system_category()}, "making the device node " + copy);
      remove_device_nodes(dir);
      return e;
    }
    out.emplace_back(copy, "/dev/xen/" + std::string(name));
  }
  if (out.empty()) {
    remove_device_nodes(dir);
    return make_error(std::make_error_code(std::errc::no_such_device),
                      host_dir + " holds none of Xen's device nodes (privcmd, evtchn, gntdev...)");
  }
  return out;
}

Result<void> seal_device_nodes(const std::string& dir) {
  for (const char* name : kDeviceNodes) {
    const std::string node = dir + "/" + name;
    struct stat st {};
    if (::lstat(node.c_str(), &st) != 0) continue;
    // Mode first: between the two calls the node is open to nobody rather than to the old owner.
    if (::chmod(node.c_str(), 0) != 0 || ::chown(node.c_str(), 0, 0) != 0) {
      return make_error({errno, std::system_category()}, "sealing the device node " + node);
    }
  }
  return {};
}

void remove_device_nodes(const std::string& dir) {
  for (const char* name : kDeviceNodes) ::unlink((dir + "/" + name).c_str());
  ::rmdir(dir.c_str());
}

}  // namespace broker::xen
