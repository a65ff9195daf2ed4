// The Xen mode's device models: what libxl's spawn and teardown do for a qemu-xen device model,
// with the broker's jail (docs/xen.md).
//
// start(domid): the uid by libxl's convention → the xenstore record with the kill uid, before
// anything runs → private Xen device nodes owned by the uid → the launcher's start, whose uid
// sweep is the kill before reuse → image/device-model-pid.
// release: @releaseDomain → the domain list → each dead domain's device model killed by uid, its
// record, nodes and uid released.
// recover(): a restarted broker reads every /libxl/<domid> record with a kill uid in its range,
// kills by uid those whose domain is gone, and tracks the rest so their release is seen.
#pragma once

#include <boost/json/object.hpp>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/xen/backend_disk.hpp"
#include "broker/xen/device_model.hpp"
#include "broker/xen/domains.hpp"
#include "broker/xen/store.hpp"
#include "broker/xen/uids.hpp"

namespace broker::xen {

// Domain death, as libxl notices it: one watch on @releaseDomain, whose events name no domain in
// Xen 4.17, and on each event the domain list read again.
inline constexpr const char* kReleaseToken = "qbroker-release";
// The token of the watches on backend disks' state.
inline constexpr const char* kBackendToken = "qbroker-backend";

struct HostConfig {
  std::string dev_dir = "/dev/xen";  // the host's Xen device nodes
  std::string node_dir;              // where the per-domain copies go (RUN/xen)
  bool allow_shared = false;         // --xen-shared-uid
};

// A disk handed to blkback for the domain (backend_disk.hpp).
struct Backend {
  std::uint32_t devid = 0;
  std::string path;   // /local/domain/0/backend/vbd/<domid>/<devid>
  BackendDisk disk;   // its fd is held until the backend is Connected, then closed
  std::string state;  // the backend's state as last read; empty before it wrote one
  bool held() const { return disk.fd.valid(); }
};

struct DeviceModel {
  std::uint32_t domid = 0;
  GuestType type = GuestType::hvm;
  uid_t uid = 0;
  bool shared = false;
  // The running instance; nullopt for a device model adopted from xenstore after a restart,
  // which is killed by uid alone.
  std::optional<lifecycle::Instance> instance;
  // Started by this broker or an earlier one with the same state (its uid is recorded there),
  // rather than by libxl: only then is the xenstore record the broker's to remove.
  bool ours = true;
  std::optional<pid_t> recorded_pid;  // image/device-model-pid, for one adopted from xenstore
  bool sealed = false;                // seal() ran
  std::vector<Backend> backends;
};

// What GET /v1/xen shows of a device model: domid, type, uid, pid, whose it is, whether its
// nodes are sealed, and each backend disk with its number, diskseq and state.
boost::json::object to_json(const DeviceModel& dm);

class Host {
 public:
  Host(Store& xs, DomainList& domains, lifecycle::Launcher& launcher, lifecycle::UidPool& uids,
       const UserDb& users, HostConfig config);

  // Starts the device model of `domid` from `spec` (its name, memory, devices); spec.xen is
  // filled here. Everything done is undone when a step fails.
  Result<const DeviceModel*> start(lifecycle::DomainSpec spec, std::uint32_t domid, GuestType type,
                                   lifecycle::FdHandover* cold = nullptr,
                                   const std::vector<std::string>& extra_args = {});
  // Takes the Xen device nodes away from `domid`'s device model (seal_device_nodes). Call once
  // QEMU answered on QMP: it restricted its handles to the domid before that.
  Result<void> seal(std::uint32_t domid);
  // Hands the disk `image` (opened by the caller beneath its image roots; `path` names it) to
  // blkback as device `devid` of `domid`: a loop device for a file, the device itself for a block
  // device, published with its number and diskseq, and held until the backend is Connected
  // (on_events watches its state). Undone whole when a step fails.
  Result<const Backend*> attach_disk(std::uint32_t domid, std::uint32_t devid,
                                     fdpass::BorrowedFd image, const std::string& path,
                                     bool read_only);
  // Kills `domid`'s device model by uid and removes its nodes, its uid and, when it is ours, its
  // xenstore record (libxl's destroy reads libxl's own record while it tears the domain down).
  Result<lifecycle::KillReport> stop(std::uint32_t domid);

  // Registers the @releaseDomain watch (xenstored fires it once at once).
  Result<void> watch() { return xs_.watch("@releaseDomain", kReleaseToken); }
  int fileno() const { return xs_.fileno(); }
  // Takes the queued watch events: a backend whose state changed is read again (and its disk's fd
  // closed once it is Connected); after a @releaseDomain, runs recover().
  Result<std::vector<std::uint32_t>> on_events(std::vector<Error>* failed = nullptr);

  // Adopts every device model recorded in xenstore with a kill uid in this broker's range that it
  // does not track yet (an earlier broker's, or one libxl started under the same convention),
  // then lists the domains and stops the device model of each that is gone or dying. Returns the
  // domids stopped; one failed stop does not hold up the others (each is added to `failed`).
  Result<std::vector<std::uint32_t>> recover(std::vector<Error>* failed = nullptr);

  const std::map<std::uint32_t, DeviceModel>& models() const { return models_; }

 private:
  std::string node_dir(std::uint32_t domid) const;
  void backend_changed(const std::string& path);
  void detach_backends(DeviceModel& dm);
  bool in_range(uid_t uid) const;

  Store& xs_;
  DomainList& domains_;
  lifecycle::Launcher& launcher_;
  lifecycle::UidPool& uids_;
  const UserDb& users_;
  HostConfig config_;
  std::map<std::uint32_t, DeviceModel> models_;
  // libxl's device models this broker killed whose record libxl has not removed yet, with the
  // pid the record names: not adopted again while that record stays. A new device model of the
  // domid has a record with another pid.
  std::map<std::uint32_t, std::optional<pid_t>> reaped_for_libxl_;
};

}  // namespace broker::xen
