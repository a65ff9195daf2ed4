// The kill harness's audit: after each restart of a SIGKILLed qbrokerd, what the API lists is
// held against what the host and each QEMU really hold: processes and uids, devices
// (qom-list, query-named-block-nodes, query-block, query-fdsets, query-pci, netdevs, VNC), the
// fds QEMU holds, the daemon's own fds, and the owner of every record, socket, cgroup, mount and
// tap. It never stops at the first disagreement: each one becomes a line of findings, so one
// round reports everything that diverged.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace qbtest::kill {

// Where one harness run keeps everything it gives the daemon and looks at afterwards.
struct Layout {
  std::string root;    // the test's temporary directory: no mount may be below it
  std::string state;   // --state-dir
  std::string run;     // --run-dir
  std::string images;  // --image-root: disk images and CD media
  std::string sock;    // the API socket
  uid_t base = 0;      // --uid-range BASE:COUNT
  unsigned uids = 0;
  std::string tap_prefix;   // every tap the harness names starts with it
  std::string cgroup_base;  // the daemon's cgroup subtree; empty without a cgroup2 hierarchy
};

// A domain as GET /v1/domains lists it.
struct ApiDisk {
  std::string id;
  std::string path;
  std::string bus;  // "scsi" or "virtio"
  bool backing = false;
};
struct ApiCdrom {
  std::string id;
  std::string medium;  // empty: no medium
};
struct ApiNic {
  std::string id;
  std::string tap;
};
struct ApiDomain {
  std::string name;
  std::string state;
  std::string job;  // empty: none
  uid_t uid = 0;
  pid_t pid = 0;
  std::vector<ApiCdrom> cdroms;
  std::vector<ApiDisk> disks;
  std::vector<ApiNic> nics;
  std::optional<std::string> vnc;  // the address clients connect to
  // Fdsets no device needs that QEMU still holds (closed only while the VM runs) -> the device
  // that had them.
  std::map<std::int64_t, std::string> fdsets_to_close;
};

// Every disagreement found, one line each.
struct Findings {
  std::vector<std::string> lines;
  void add(std::string line) { lines.push_back(std::move(line)); }
  bool empty() const { return lines.empty(); }
  std::string text() const;
};

// GET /v1/domains; nullopt when the daemon does not answer it.
std::optional<std::vector<ApiDomain>> list_domains(const std::string& sock);

// Reaps every exited child of this process but `keep` (the daemon, whose status its Child
// collects): QEMUs re-parented to the test when their daemon died.
void reap_children_except(pid_t keep);

struct AuditResult {
  Findings findings;
  std::vector<ApiDomain> domains;  // as listed once every job had ended
  std::size_t daemon_fds = 0;      // the daemon's non-socket fds after the audit
};

// The audit after a restart of the daemon `daemon_pid`. Waits up to `settle` for every job to end
// (an interrupted removal is resumed in the background) before it looks.
AuditResult audit(const Layout& layout, pid_t daemon_pid, std::chrono::milliseconds settle);

// After every domain was destroyed: nothing runs in the uid range, and nothing is left in the
// state and run directories, the mount table, the taps or the cgroups.
Findings audit_empty(const Layout& layout, pid_t daemon_pid);

}  // namespace qbtest::kill
