/* What a compromised QEMU could try from inside its jail, run as a domain would: same namespaces,
 * uid, rlimits and jail, and QEMU's own seccomp filter, which the test takes from a running QEMU
 * and passes on fd 3 as raw BPF instructions. It reports, one line each on stdout:
 *   writable PATH OP    a path it could open for writing or create something in (never expected)
 *   device PATH         a device node it could open for writing (the jail's /dev/null, ...)
 *   reachable PID OP    a process outside itself it could signal, trace or open a pidfd of
 *   connected WHAT      a socket outside its namespace it could reach
 *   seccomp MODE        PR_GET_SECCOMP once the filter is in (2: a filter)
 *   checked FILES DIRS PIDS   what it went through, last
 * A syscall the filter refuses kills the prober (SIGSYS), as it would kill QEMU: it tries none
 * (mount, for one; the jail's mounts are checked from outside).
 * Usage: jail_prober ABSTRACT_NAME TCP_PORT. Built without sanitizers: there is no /proc in the
 * jail for a sanitizer runtime to read. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static long files, dirs, pids;

static int install_filter(int fd) {
  static struct sock_filter insns[BPF_MAXINSNS];
  size_t got = 0;
  for (;;) {
    ssize_t n = read(fd, (char*)insns + got, sizeof(insns) - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fd);
  if (got == 0 || got % sizeof(struct sock_filter) != 0) return -1;
  struct sock_fprog prog = {(unsigned short)(got / sizeof(struct sock_filter)), insns};
  return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* Creating in a directory: a file, a directory, a symlink. Anything made is removed again. */
static void probe_dir(int dir, const char* path) {
  static const char name[] = ".qb-prober";
  int fd = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd >= 0) {
    printf("writable %s create\n", path);
    close(fd);
    unlinkat(dir, name, 0);
  }
  if (mkdirat(dir, name, 0700) == 0) {
    printf("writable %s mkdir\n", path);
    unlinkat(dir, name, AT_REMOVEDIR);
  }
  if (symlinkat("/", dir, name) == 0) {
    printf("writable %s symlink\n", path);
    unlinkat(dir, name, 0);
  }
}

/* Writing to a file or device, without truncating or changing it. */
static void probe_file(int dir, const char* name, const char* path, mode_t mode) {
  int fd = openat(dir, name, O_WRONLY | O_APPEND | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) return;
  close(fd);
  printf("%s %s\n", S_ISREG(mode) ? "writable" : "device", path);
}

static void walk(int dir, const char* path) {
  ++dirs;
  probe_dir(dir, path);
  DIR* d = fdopendir(dup(dir));
  if (d == NULL) return;
  struct dirent* e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    char child[4096];
    snprintf(child, sizeof(child), "%s%s%s", path, strcmp(path, "/") == 0 ? "" : "/", e->d_name);
    struct stat st;
    if (fstatat(dir, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      int sub = openat(dir, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0) {
        walk(sub, child);
        close(sub);
      }
    } else if (S_ISREG(st.st_mode) || S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ||
               S_ISFIFO(st.st_mode)) {
      ++files;
      probe_file(dir, e->d_name, child, st.st_mode);
    }
  }
  closedir(d);
}

/* Every pid its namespace could name, up to the kernel's largest: none but itself may answer. */
static void probe_processes(void) {
  pid_t self = getpid();
  if (kill(-1, 0) == 0) printf("reachable -1 kill\n");
  for (pid_t pid = 1; pid <= 4194304; ++pid) {
    if (pid == self) continue;
    ++pids;
    if (kill(pid, 0) == 0 || errno == EPERM) printf("reachable %d kill\n", pid);
    if (pid > 65536) {
      pid += 4095; /* sampled above the usual pid_max */
      continue;
    }
    int pfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pfd >= 0) {
      printf("reachable %d pidfd\n", pid);
      close(pfd);
    }
  }
}

static void probe_network(const char* abstract_name, int port) {
  int u = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (u >= 0) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t len = strlen(abstract_name);
    if (len + 1 < sizeof(a.sun_path)) {
      memcpy(a.sun_path + 1, abstract_name, len);
      if (connect(u, (struct sockaddr*)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len)) == 0) {
        printf("connected @%s\n", abstract_name);
      }
    }
    close(u);
  }
  int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (t >= 0) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                            .sin_addr = {htonl(INADDR_LOOPBACK)}};
    if (connect(t, (struct sockaddr*)&a, sizeof(a)) == 0) printf("connected 127.0.0.1:%d\n", port);
    close(t);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (install_filter(3) != 0) {
    printf("seccomp failed %d\n", errno);
    return 1;
  }
  printf("seccomp %d\n", prctl(PR_GET_SECCOMP));
  int root = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (root >= 0) walk(root, "/");
  probe_processes();
  probe_network(argv[1], atoi(argv[2]));
  printf("checked %ld %ld %ld\n", files, dirs, pids);
  return 0;
}
