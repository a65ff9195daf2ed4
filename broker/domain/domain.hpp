// broker/domain is what a domain is and how it runs, below the flows: Domain, the Domains table,
// records, the QMP session, the event bus and the validated requests.
//
// One running domain: its lifecycle instance, its QMP client, the devices plugged into it and its
// job slot. Held in the Domains table, used by the flows, touched only on the broker's
// io_context. What each object is called inside QEMU is in broker/domain/names.hpp.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/json/array.hpp>
#include <boost/json/object.hpp>

#include "broker/core/error.hpp"
#include "broker/core/metrics.hpp"
#include "broker/domain/cold_plan.hpp"
#include "broker/domain/qemu_log.hpp"
#include "broker/domain/requests.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "fdpass/opener.hpp"
#include "qmp/client.hpp"

namespace broker {

// adopting: read back from its record after a restart, its QEMU being reconnected (at most the
// adopt timeout). unresponsive: adopted, its QEMU alive but not answering QMP; the broker keeps
// trying and never kills it for being slow.
enum class RunState { starting, paused, running, shutdown, stopping, adopting, unresponsive };
std::string_view to_string(RunState s);

struct CdromState {
  std::string id;
  std::string path;  // empty: no medium
  fdpass::Identity identity;
  std::int64_t fdset = -1;
  std::string slot;  // the SCSI controller's bus
};

struct DiskState {
  DiskSpec spec;
  fdpass::Identity identity;
  std::int64_t fdset = -1;
  std::int64_t backing_fdset = -1;
  std::string slot;  // root port (virtio) or SCSI bus
};

struct NicState {
  NicSpec spec;
  std::string tap;  // actual tap name
  std::string slot;
};

struct VncState {
  VncSpec spec;
  std::string address;  // what a client connects to: "127.0.0.1:5901" or "unix:/path"
};

class Domain;

// The job slot: one job per domain at a time (docs/concurrency.md). Released on destruction.
class JobGuard {
 public:
  JobGuard(JobGuard&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  JobGuard& operator=(JobGuard&&) = delete;
  ~JobGuard() { release(); }
  // Ends the job now (before the state file is written for the last time).
  void release();

 private:
  friend class Domain;
  explicit JobGuard(Domain* d) : d_(d) {}
  Domain* d_;
};

class Domain {
 public:
  explicit Domain(lifecycle::DomainSpec spec) : spec_(std::move(spec)) {}

  const std::string& name() const { return spec_.name; }
  const lifecycle::DomainSpec& spec() const { return spec_; }
  lifecycle::Instance& instance() { return instance_; }
  const lifecycle::Instance& instance() const { return instance_; }

  // Valid once started; null after QEMU exited.
  qmp::Client* qmp() { return qmp_.get(); }
  void set_qmp(std::unique_ptr<qmp::Client> c) { qmp_ = std::move(c); }

  RunState state() const { return state_; }
  void set_state(RunState s) { state_ = s; }

  // Claims the job slot, or errc::busy naming the job that holds it. `target` is the device the
  // job works on and `args` what a restarted broker needs beyond it to finish or undo the job
  // (the path of a CD medium being inserted); both are recorded in the state file.
  Result<JobGuard> begin_job(std::string job, std::string target = {},
                             boost::json::object args = {});
  const std::string& job() const { return job_; }
  const std::string& job_target() const { return job_target_; }
  const boost::json::object& job_args() const { return job_args_; }

  // A job an earlier broker recorded and did not finish (set from the state file).
  struct PendingJob {
    std::string kind;
    std::string target;
    boost::json::object args;
  };
  std::optional<PendingJob> interrupted;

  // Takes a free hot-pluggable root port ("rpN") for `owner`, or wrong_state naming `owner` when
  // all are taken.
  Result<std::string> allocate_slot(const std::string& owner);
  void free_slot(const std::string& slot);
  void claim_slot(const std::string& slot, const std::string& owner) { slots_[slot] = owner; }
  const std::map<std::string, std::string>& slots() const { return slots_; }
  std::size_t free_slots() const;

  std::map<std::string, CdromState> cdroms;
  std::map<std::string, DiskState> disks;
  std::map<std::string, NicState> nics;
  std::optional<VncState> vnc;
  // VNC by add_client (QEMU without display-update): the broker's accept loop. Releasing it stops
  // the loop and closes the listener (broker/flows/vnc.cpp). Not persisted: a restarted broker
  // no longer holds the listener.
  std::shared_ptr<void> vnc_acceptor;
  bool scsi_controller = false;  // "qb-scsi0" plugged
  std::string scsi_slot;
  // fdsets no device needs that QEMU still holds: QEMU 7.2 closes a removed fd only while the VM
  // runs, so an unplug on a paused domain leaves the image open until it next runs. fdset id ->
  // the device that used it. Reported, recorded, and removed again when the VM runs
  // (broker/domain/fdsets.hpp).
  std::map<std::int64_t, std::string> fdsets_to_close;

  // What the broker reads of QEMU's stdout/stderr (null when it could not re-open the pipe).
  std::shared_ptr<QemuLog> log;

  // Set while a create plans the devices QEMU gets on its command line: the flows' QMP calls and
  // fd hand-overs are written down there instead of sent (broker/domain/cold_plan.hpp).
  std::unique_ptr<ColdPlan> cold_plan;

  // A destroy was asked for: recorded before the teardown starts, so a restart finishes it.
  bool destroying = false;
  // Its last teardown could not kill everything under its uid: it stays listed (stopping), a
  // DELETE may try again, and Domains::retry_stuck() does so in the background.
  bool teardown_failed = false;
  // Where its QMP round trips are counted, once connected (Domains::connect).
  metrics::Registry* metrics = nullptr;

  // True when `id` names any device of this domain.
  bool has_device(const std::string& id) const;

  // Everything above as JSON, for GET and for the state file.
  boost::json::object devices_json() const;
  // fdsets_to_close as [{"fdset": N, "device": id}].
  boost::json::array fdsets_to_close_json() const;

 private:
  friend class JobGuard;
  lifecycle::DomainSpec spec_;
  lifecycle::Instance instance_;
  std::unique_ptr<qmp::Client> qmp_;
  RunState state_ = RunState::starting;
  std::string job_;
  std::string job_target_;
  boost::json::object job_args_;
  std::map<std::string, std::string> slots_;  // "rpN" -> owner
};

}  // namespace broker
