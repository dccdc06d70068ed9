"""Key providers: the tokens a crypto service can front, behind providers.base.Provider."""
