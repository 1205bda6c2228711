package hsm

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"
)

// The only package-level state in this package. A PKCS#11 library is process-global: dlopen of
// one path yields one instance, C_Initialize/C_Finalize act on that instance for the whole
// process, and SoftHSM reads SOFTHSM2_CONF (a process-wide environment variable) inside
// C_Initialize. So providers that share a library path must share one initialisation, and
// setting SOFTHSM2_CONF + calling C_Initialize must be serialised across all providers.
// libraryRegistryMu guards libraryRegistry, every module's refs/confPath, and every
// setenv + C_Initialize/C_Finalize pair.
var (
	libraryRegistryMu sync.Mutex
	libraryRegistry   = map[string]*module{}
)

// module is one loaded PKCS#11 library, shared by every provider opened on its path.
// Libraries are never unloaded (dlclose of SoftHSM with OpenSSL inside is not worth the risk);
// the last provider to close finalizes it, and the next one to open initializes it again.
type module struct {
	path string
	ctx  *pkcs11.Ctx

	// mu orders PKCS#11 use against re-initialisation: every operation holds RLock while it
	// uses sessions or object handles; C_Initialize/C_Finalize, recovery, Close and the
	// trusted-wrap login dance hold Lock. Providers' live state is guarded by it too.
	mu          sync.RWMutex
	initialized bool
	// stale is set when the token looked gone: SoftHSM never notices a token coming back
	// without C_Finalize + C_Initialize, so the next recovery re-initialises the library.
	stale bool
	// gen counts successful C_Initialize calls; session and object handles from an older
	// generation are meaningless (and may alias handles of the new one).
	gen uint64

	// guarded by libraryRegistryMu
	refs     int
	confPath string // SOFTHSM2_CONF used at C_Initialize; "" = leave the environment alone
}

// acquireModule loads (once per process) the library at path and takes a reference to it.
func acquireModule(path, confPath string) (*module, error) {
	libraryRegistryMu.Lock()
	defer libraryRegistryMu.Unlock()
	m := libraryRegistry[path]
	if m == nil {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("hsm: pkcs#11 library %q: %w (for SoftHSM: apt-get install -y softhsm2)", path, err)
		}
		ctx := pkcs11.New(path)
		if ctx == nil {
			return nil, fmt.Errorf("hsm: cannot load pkcs#11 library %q (not a loadable shared object, wrong architecture or missing dependencies)", path)
		}
		m = &module{path: path, ctx: ctx}
		libraryRegistry[path] = m
	}
	if m.refs > 0 && m.confPath != confPath {
		return nil, fmt.Errorf("hsm: pkcs#11 library %q is already in use with SOFTHSM2_CONF=%q in this process; "+
			"a second token config (%q) needs its own copy of the library at another path", path, m.confPath, confPath)
	}
	m.confPath = confPath
	m.refs++
	return m, nil
}

// releaseModule drops a reference; the last one finalizes the library. Caller holds m.mu.Lock.
func (m *module) releaseLocked() {
	libraryRegistryMu.Lock()
	defer libraryRegistryMu.Unlock()
	m.refs--
	if m.refs == 0 && m.initialized {
		_ = m.ctx.Finalize()
		m.initialized = false
		m.gen++
	}
}

// reinitLocked (re)initialises the library: C_Finalize if initialised, then C_Initialize with
// SOFTHSM2_CONF set to the module's config. Caller holds m.mu.Lock.
func (m *module) reinitLocked() error {
	libraryRegistryMu.Lock()
	defer libraryRegistryMu.Unlock()
	if m.initialized {
		_ = m.ctx.Finalize()
		m.initialized = false
		m.gen++
	}
	conf := m.confPath
	if conf == "" {
		conf = os.Getenv("SOFTHSM2_CONF")
	}
	if err := checkSoftHSMConfig(m.path, conf, m.confPath != ""); err != nil {
		m.stale = true
		return err
	}
	if m.confPath != "" {
		prev, had := os.LookupEnv("SOFTHSM2_CONF")
		os.Setenv("SOFTHSM2_CONF", m.confPath)
		defer func() {
			if had {
				os.Setenv("SOFTHSM2_CONF", prev)
			} else {
				os.Unsetenv("SOFTHSM2_CONF")
			}
		}()
	}
	err := m.ctx.Initialize()
	if err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		m.stale = true
		return fmt.Errorf("hsm: C_Initialize of %q (SOFTHSM2_CONF=%q): %w", m.path, conf, err)
	}
	m.initialized = true
	m.stale = false
	m.gen++
	return nil
}

// checkSoftHSMConfig catches the SoftHSM misconfiguration that C_Initialize reports only as
// CKR_GENERAL_ERROR with nothing on stderr: a config whose directories.tokendir does not exist.
// conf is the SoftHSM config path ("" = SoftHSM's compiled-in default). A config file that
// cannot be read is an error only when it was configured explicitly; other PKCS#11 libraries
// ignore SoftHSM's config, so for them a missing default is fine.
func checkSoftHSMConfig(library, conf string, explicit bool) error {
	if conf == "" {
		if !strings.Contains(library, "softhsm") {
			return nil
		}
		conf = "/etc/softhsm/softhsm2.conf"
	}
	f, err := os.Open(conf)
	if err != nil {
		if explicit {
			return fmt.Errorf("hsm: softhsm config: %w", err)
		}
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok || strings.TrimSpace(key) != "directories.tokendir" {
			continue
		}
		dir := strings.TrimSpace(val)
		st, err := os.Stat(dir)
		if err != nil {
			return fmt.Errorf("hsm: softhsm token directory %q (directories.tokendir in %s) is missing: "+
				"SoftHSM would fail C_Initialize with a bare CKR_GENERAL_ERROR: %w", dir, conf, err)
		}
		if !st.IsDir() {
			return fmt.Errorf("hsm: softhsm token directory %q (directories.tokendir in %s) is not a directory", dir, conf)
		}
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("hsm: softhsm config %s: %w", conf, err)
	}
	return nil
}
