// Reading /proc: which processes run under a uid. The proc root is a parameter so tests can
// point it elsewhere; the daemon passes "/proc".
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

namespace broker::lifecycle {

struct ProcInfo {
  pid_t pid = 0;
  bool zombie = false;
  bool kill_pending = false;  // SIGKILL queued: the process is on its way out
  char state = '?';           // /proc/<pid>/status State: R, S, D, Z, T, ...
  std::string uids;           // real, effective, saved and filesystem uid, as /proc shows them
};

// Processes with `uid` as any of their real, effective, saved or filesystem uids.
std::vector<ProcInfo> processes_of_uid(const std::string& proc_root, uid_t uid);

// Process `pid`, if it exists and holds `uid` as any of its four uids.
std::optional<ProcInfo> process_of_uid(const std::string& proc_root, pid_t pid, uid_t uid);

// Counts only live (non-zombie) processes.
std::size_t live_processes_of_uid(const std::string& proc_root, uid_t uid);

// Start time (field 22 of /proc/<pid>/stat, clock ticks since boot): with the pid and the uid it
// identifies one process across a broker restart. 0 when the process is gone.
unsigned long long process_start_time(const std::string& proc_root, pid_t pid);

// The state letter of /proc/<pid>/stat (R, S, D, Z, X, ...), or 0 when there is no such process.
char process_state(const std::string& proc_root, pid_t pid);

}  // namespace broker::lifecycle
