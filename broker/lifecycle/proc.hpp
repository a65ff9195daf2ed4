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

// Processes with `uid` as any of their real, effective, saved or filesystem uids. Kernel threads
// are skipped unread (kernel_threads below); on a quiet host they are most of /proc.
std::vector<ProcInfo> processes_of_uid(const std::string& proc_root, uid_t uid);

// The pids of kthreadd (pid 2, when its comm says so) and of its children, every kernel thread:
// they run as root and never hold a domain's uid, and no user process can become a child of
// kthreadd (an orphan is reparented to init or a subreaper). Empty when `proc_root` shows no
// kthreadd or no children list (CONFIG_PROC_CHILDREN), and then nothing is skipped.
std::vector<pid_t> kernel_threads(const std::string& proc_root);

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
